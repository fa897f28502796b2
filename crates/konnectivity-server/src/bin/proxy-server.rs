//! `proxy-server`: parses the reference's flags and runs [`konnectivity_server::run`] until SIGTERM/SIGINT.
use konnectivity_process::effective_flags::EffectiveFlags;
use konnectivity_server::flags::ServerFlags;

fn main() -> std::process::ExitCode {
    let (flags, effective) =
        EffectiveFlags::parse::<ServerFlags>(konnectivity_process::flags::normalize_args(std::env::args()));
    let logging = flags.klog.log_settings("proxy-server");
    konnectivity_process::entry::run(
        "proxy-server",
        logging,
        || {
            effective.log();
            flags.into_config()
        },
        |config, stop| async move {
            tracing::info!(server_id = %config.server_id, "starting proxy-server");
            konnectivity_server::run(config, stop).await?;
            tracing::info!("proxy-server stopped");
            Ok(())
        },
    )
}
