//! `proxy-agent`: parses the reference's flags and runs [`konnectivity_agent::run`].
//!
//! Signals: the first SIGTERM/SIGINT drains, as the reference (DRAIN to every server, no new server
//! streams, dials a server still sends are served); unlike the reference, the agent then exits by itself once
//! it has carried nothing for `--drain-idle-period`, or when `--drain-timeout` passes (closing what remains).
//! A second signal exits at once.
use konnectivity_agent::flags::AgentFlags;
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let (flags, effective) =
        AgentFlags::parse_with_effective(konnectivity_process::flags::normalize_args(std::env::args()))
            .unwrap_or_else(|e| e.exit());
    let logging = flags.klog.log_settings("proxy-agent");
    konnectivity_process::entry::run(
        "proxy-agent",
        logging,
        || {
            effective.log();
            flags.into_config()
        },
        |config, drain| async move {
            let servers: Vec<String> = config.servers.iter().map(|s| s.to_string()).collect();
            tracing::info!(agent_id = %config.agent_id, servers = %servers.join(","), "starting proxy-agent");
            // Stops by itself at the end of a drain; the second signal exits the process from the handler.
            konnectivity_agent::run(config, drain, CancellationToken::new()).await?;
            Ok(())
        },
    )
}
