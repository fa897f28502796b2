//! Process signals, handled as the reference does: the first SIGTERM or SIGINT starts a graceful stop, a
//! second one exits at once with status 1.

use tokio_util::sync::CancellationToken;

/// Spawns a task that cancels `on_first` at the first SIGTERM/SIGINT and exits the process at the second.
pub fn spawn_signal_handler(on_first: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::info!("received stop signal; stopping gracefully (send it again to exit now)");
                on_first.cancel();
            } else {
                tracing::warn!("received second stop signal; exiting now");
                std::process::exit(1);
            }
        }
    });
    Ok(())
}
