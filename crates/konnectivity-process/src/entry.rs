//! What every binary's `main` does around its own work: logging from the klog flags, the configuration, a
//! multi-threaded runtime, and a signal handler; then the work, and an exit code a service manager can act on.

use crate::logging::{self, LogSettings};
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Runs `program`: installs logging (`settings`; exit code 1 if that fails), builds its configuration (exit
/// code 2 with the error if that fails), starts a runtime whose SIGTERM/SIGINT handler cancels the token `work`
/// gets (a second signal exits at once), and runs `work` (a failure exits with 1, its error chain on stderr).
pub fn run<C, E, F, W>(program: &str, settings: LogSettings, config: impl FnOnce() -> Result<C, E>, work: W) -> ExitCode
where
    E: Display,
    W: FnOnce(C, CancellationToken) -> F,
    F: Future<Output = anyhow::Result<()>>,
{
    if let Err(e) = logging::init_klog(settings) {
        eprintln!("{program}: {e}");
        return ExitCode::from(1);
    }
    raise_open_file_limit();
    let config = match config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{program}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().thread_name(program).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let stop = CancellationToken::new();
        crate::signals::spawn_signal_handler(stop.clone())
            .map_err(|e| anyhow::anyhow!("installing signal handlers: {e}"))?;
        work(config, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard limit, as the Go runtime does at start: service managers
/// commonly leave the soft limit at 1,024, which a few thousand idle connections would use up (and then every
/// accept fails, kube-apiserver's included). Logged, and left alone if it cannot be raised.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit to its hard limit"),
            Err(e) => tracing::warn!(soft, hard, "could not raise the open-file limit: {e}"),
        },
        Ok((soft, _)) => tracing::debug!(limit = soft, "open-file limit already at its hard limit"),
        Err(e) => tracing::warn!("could not read the open-file limit: {e}"),
    }
}
