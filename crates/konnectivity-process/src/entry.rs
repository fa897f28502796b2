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
