//! Logging set-up. The reference logs through klog with a `-v` verbosity (its binaries default to 4); we map
//! that onto tracing levels, and `RUST_LOG` overrides it for finer control.

use tracing_subscriber::EnvFilter;

/// Maps a klog `-v` level onto a tracing filter: up to 4 is `info`, 5 and 6 `debug`, above that `trace`.
pub fn filter_for_verbosity(v: u32) -> &'static str {
    match v {
        0..=4 => "info",
        5..=6 => "debug",
        _ => "trace",
    }
}

/// Installs the global subscriber writing to stderr. Safe to call more than once (later calls do nothing).
pub fn init(v: u32) {
    init_with(filter_for_verbosity(v));
}

/// Installs the global subscriber for `--v` and `--log-format` (`text` or `json`: one JSON object per line,
/// with the span fields such as agent_id and connect_id, for log pipelines).
pub fn init_format(v: u32, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter_for_verbosity(v)));
    // Colours only on a terminal: `kubectl logs` and log pipelines get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
    };
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Like [`init`] with an explicit default filter (such as `warn`), still overridden by `RUST_LOG`.
pub fn init_with(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}
