//! Running the compiled suite: inside the namespace, from the package's directory, in a process group of its
//! own so that nothing it started (our agents) outlives it.

use super::go_test_output::{self, Verdict};
use super::network::SuiteNetwork;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The Go package of the suite, resolved through `interop/go.mod`.
const SUITE_PACKAGE: &str = "sigs.k8s.io/apiserver-network-proxy/tests";
/// The suite's own timeout (`-test.timeout`); all of it runs in about 85 s.
const SUITE_TIMEOUT: Duration = Duration::from_secs(300);
/// How much longer than its own timeout the suite may take before it is killed from here.
const KILL_AFTER: Duration = Duration::from_secs(60);

/// The compiled suite and the directory it runs from.
pub struct Suite {
    binary: PathBuf,
    /// The package's directory in the module cache; `go test` runs a test binary from there.
    pub dir: PathBuf,
    /// Our agent (`-agent-path`).
    pub agent: PathBuf,
    /// The suite's TMPDIR (its certificates and sockets go there) and where its output is written.
    tmp: PathBuf,
}

/// A test run again on its own.
#[derive(Debug)]
pub struct Rerun {
    pub name: String,
    /// Each run's verdict, in order.
    pub verdicts: Vec<Verdict>,
    /// What the first failing run logged.
    pub log: Vec<String>,
}

impl Rerun {
    /// Which run (from 1) first had `verdict`.
    pub fn first(&self, verdict: Verdict) -> Option<usize> {
        self.verdicts.iter().position(|v| *v == verdict).map(|i| i + 1)
    }
}

impl Suite {
    /// Finds `interop/bin/anp-tests` (`interop/build.sh` builds it) and the package's directory (`go list`).
    pub fn locate(agent: PathBuf, tmp: &Path) -> anyhow::Result<Self> {
        let interop = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop");
        let binary = interop.join("bin/anp-tests");
        anyhow::ensure!(binary.exists(), "{} is missing: run interop/build.sh (scripts/test does)", binary.display());
        let out = std::process::Command::new("go")
            .args(["list", "-mod=readonly", "-f", "{{.Dir}}", SUITE_PACKAGE])
            .current_dir(&interop)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| anyhow::anyhow!("running `go list` (the reference suite needs Go): {e}"))?;
        anyhow::ensure!(
            out.status.success(),
            "go list {SUITE_PACKAGE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        anyhow::ensure!(dir.is_dir(), "{} (from go list) is not a directory", dir.display());
        Ok(Self { binary, dir, agent, tmp: tmp.to_path_buf() })
    }

    /// The suite binary with `args`, inside the namespace, in a process group of its own.
    fn command(&self, network: &SuiteNetwork, args: &[String]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", network.ns().name()])
            .arg(&self.binary)
            .args(args)
            .arg(format!("-agent-path={}", self.agent.display()))
            .current_dir(&self.dir)
            .env("TMPDIR", &self.tmp)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }

    /// The names of the suite's tests (`-test.list`).
    pub async fn list(&self, network: &SuiteNetwork) -> anyhow::Result<Vec<String>> {
        let out = self.command(network, &["-test.list=^Test".into()]).output().await?;
        anyhow::ensure!(out.status.success(), "listing the suite's tests: {}", String::from_utf8_lossy(&out.stderr));
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("Test"))
            .map(str::to_string)
            .collect();
        anyhow::ensure!(!names.is_empty(), "the suite lists no tests");
        Ok(names)
    }

    /// Runs the suite verbosely with `args` (which tests, how often), its output (and the agents') into
    /// `name`.log; kills what is left of it when it is done. Returns the exit status and the log's path.
    pub async fn run(
        &self,
        network: &SuiteNetwork,
        args: &[String],
        name: &str,
    ) -> anyhow::Result<(std::process::ExitStatus, PathBuf)> {
        let log = self.tmp.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut all = vec!["-test.v".to_string(), format!("-test.timeout={}s", SUITE_TIMEOUT.as_secs())];
        all.extend_from_slice(args);
        let child = self.command(network, &all).stdout(file.try_clone()?).stderr(file).spawn()?;
        let mut group = ProcessGroup(child);
        let status = match tokio::time::timeout(SUITE_TIMEOUT + KILL_AFTER, group.0.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                group.kill();
                group.0.wait().await?
            }
        };
        Ok((status, log))
    }

    /// Runs `name` `count` more times; with `failfast`, stops at its first failure.
    pub async fn rerun(&self, network: &SuiteNetwork, name: &str, count: u32, failfast: bool) -> anyhow::Result<Rerun> {
        let mut args = vec![format!("-test.run=^{name}$"), format!("-test.count={count}")];
        if failfast {
            args.push("-test.failfast".into());
        }
        let (_, log) = self.run(network, &args, &format!("rerun-{name}")).await?;
        let run = go_test_output::parse(&std::fs::read_to_string(&log)?);
        let runs: Vec<_> = run.outcomes.iter().filter(|o| o.name == name).collect();
        anyhow::ensure!(!runs.is_empty(), "running {name} again: no result (output: {})", keep_log(&log));
        let log = runs.iter().find(|o| o.verdict != Verdict::Pass).map(|o| o.log.clone()).unwrap_or_default();
        Ok(Rerun { name: name.to_string(), verdicts: runs.iter().map(|o| o.verdict).collect(), log })
    }
}

/// The suite's process and everything it started (its agents): SIGKILLed as a group when dropped.
struct ProcessGroup(tokio::process::Child);

impl ProcessGroup {
    fn kill(&self) {
        if let Some(pid) = self.0.id() {
            // The group's id is its leader's pid (process_group(0)).
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits a little for every process in the namespace to end, then SIGKILLs (by pid) and returns those left.
pub async fn end_what_is_left(network: &SuiteNetwork) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = network.pids().unwrap_or_default();
        if pids.is_empty() {
            return pids;
        }
        if Instant::now() > deadline {
            for &pid in &pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
            }
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies a log where it survives the test's temporary directory; returns where.
pub fn keep_log(log: &Path) -> String {
    let keep = std::env::temp_dir().join(format!("krs-anp-suite-failed-{}", std::process::id()));
    let target = keep.join(log.file_name().unwrap_or_default());
    match std::fs::create_dir_all(&keep).and_then(|()| std::fs::copy(log, &target)) {
        Ok(_) => target.display().to_string(),
        Err(e) => format!("(not kept: {e})"),
    }
}
