//! `proxy-server`: parses the reference's flags and runs [`konnectivity_server::run`].
use anyhow::Context;
use clap::Parser;
use konnectivity_server::flags::ServerFlags;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let flags = ServerFlags::parse_from(konnectivity_process::flags::normalize_args(std::env::args()));
    if let Err(e) = konnectivity_process::logging::init_klog(flags.klog.log_settings("proxy-server")) {
        eprintln!("proxy-server: {e}");
        return std::process::ExitCode::from(1);
    }
    let config = match flags.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxy-server: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().thread_name("proxy-server").enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proxy-server: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        konnectivity_process::signals::spawn_signal_handler(shutdown.clone()).context("installing signal handlers")?;
        tracing::info!(server_id = %config.server_id, "starting proxy-server");
        konnectivity_server::run(config, shutdown).await?;
        tracing::info!("proxy-server stopped");
        Ok(())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("proxy-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
