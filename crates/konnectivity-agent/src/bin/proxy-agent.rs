//! `proxy-agent`: parses the reference's flags and runs [`konnectivity_agent::run`].
//!
//! Signals as the reference: the first SIGTERM/SIGINT sends DRAIN to every server and stops new server
//! connections, the second exits. Unlike the reference, the agent also exits on its own once draining and
//! no endpoint connection is left.
use anyhow::Context;
use clap::Parser;
use konnectivity_agent::flags::AgentFlags;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let flags = AgentFlags::parse_from(konnectivity_transport::flags::normalize_args(std::env::args()));
    konnectivity_transport::logging::init_format(flags.klog.v, flags.klog.log_format);
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
        let shutdown = CancellationToken::new();
        konnectivity_transport::signals::spawn_signal_handler(drain.clone()).context("installing signal handlers")?;
        tracing::info!(agent_id = %config.agent_id, server = %format!("{}:{}", config.server_host, config.server_port), "starting proxy-agent");
        let agent = konnectivity_agent::start(config, drain.clone(), shutdown.clone()).await?;
        let handle = agent.handle();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            drain.cancelled().await;
            // Draining: let open connections finish, then stop.
            loop {
                if handle.endpoint_connections() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Deliver what is still queued for the servers, half-close, and give them a moment to close.
            tracing::info!("drained: no connections left; closing the server streams");
            handle.finish();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !handle.connected_servers().is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::info!("stopping");
            stopper.cancel();
        });
        agent.wait().await;
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
