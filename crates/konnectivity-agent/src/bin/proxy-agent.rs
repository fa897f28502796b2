//! `proxy-agent`: parses the reference's flags and runs [`konnectivity_agent::run`].
//!
//! Signals: the first SIGTERM/SIGINT drains, as the reference (DRAIN to every server, no new server
//! streams); unlike the reference, the agent then exits by itself once no connection is left, or when
//! `--drain-timeout` passes (closing what remains). A second signal exits at once.
use anyhow::Context;
use konnectivity_agent::flags::AgentFlags;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let flags = AgentFlags::parse_args(konnectivity_process::flags::normalize_args(std::env::args()))
        .unwrap_or_else(|e| e.exit());
    if let Err(e) = konnectivity_process::logging::init_klog(flags.klog.log_settings("proxy-agent")) {
        eprintln!("proxy-agent: {e}");
        return std::process::ExitCode::from(1);
    }
    let config = match flags.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxy-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().thread_name("proxy-agent").enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proxy-agent: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        let drain = CancellationToken::new();
        konnectivity_process::signals::spawn_signal_handler(drain.clone()).context("installing signal handlers")?;
        let servers: Vec<String> = config.servers.iter().map(|s| s.to_string()).collect();
        tracing::info!(agent_id = %config.agent_id, servers = %servers.join(","), "starting proxy-agent");
        // Stops by itself at the end of a drain; the second signal exits the process from the handler.
        konnectivity_agent::run(config, drain, CancellationToken::new()).await?;
        Ok(())
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
