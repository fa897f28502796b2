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

/// Installs the global subscriber for `--v` and `--log-format` (`text`; `json`: one JSON object per line, with
/// the span fields such as agent_id and connect_id, for log pipelines; `klog`: the reference's klog text lines, see
/// [`crate::klog_format`]).
pub fn init_format(v: u32, format: LogFormat) {
    // Colours only on a terminal: `kubectl logs` and log pipelines get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    install(v, format, std::io::stderr, ansi);
}

/// Installs the global subscriber (a second call does nothing) writing `format` lines through `writer`.
fn install<W>(v: u32, format: LogFormat, writer: W, ansi: bool)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter_for_verbosity(v)));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_target(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.with_ansi(false).json().with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Klog => builder
            .with_ansi(false)
            .fmt_fields(crate::klog_format::KlogFields)
            .event_format(crate::klog_format::KlogFormat::new())
            .try_init(),
    };
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
    /// klog's text lines (`I1202 08:00:00.000000   12345 file.rs:42] "message" key="value"`), as the reference
    /// writes them.
    Klog,
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

/// Where log lines go (klog's `--logtostderr`, `--log-file`, `--log-dir`, `--alsologtostderr`,
/// `--stderrthreshold`, `--log-file-max-size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogDestination {
    /// Standard error only (klog's default).
    Stderr,
    /// A file, appended to and rotated to `<path>.1` past `max_bytes` (0: never); lines at or above `stderr_from`
    /// (tracing's order: ERROR is the most severe) are also written to standard error.
    File {
        /// The log file.
        path: std::path::PathBuf,
        /// Rotation size.
        max_bytes: u64,
        /// The least severe level that is copied to stderr.
        stderr_from: tracing::Level,
    },
}

/// A klog severity name or number (INFO/0, WARNING/1, ERROR/2, FATAL/3) as a tracing level.
pub fn parse_severity(s: &str) -> Option<tracing::Level> {
    match s.to_ascii_uppercase().as_str() {
        "INFO" | "0" => Some(tracing::Level::INFO),
        "WARNING" | "1" => Some(tracing::Level::WARN),
        "ERROR" | "2" | "FATAL" | "3" => Some(tracing::Level::ERROR),
        _ => None,
    }
}

struct FileSink {
    path: std::path::PathBuf,
    file: std::fs::File,
    size: u64,
    max_bytes: u64,
}

impl FileSink {
    fn open(path: &std::path::Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new().create(true).append(true).open(path)
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if self.max_bytes > 0 && self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            // If the rename fails (permissions), keep writing to the same file rather than lose lines.
            if std::fs::rename(&self.path, &rotated).is_ok()
                && let Ok(f) = Self::open(&self.path)
            {
                self.file = f;
                self.size = 0;
            }
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }
}

/// The `MakeWriter` for klog-style file output: every line to the file, severe ones to stderr as well.
#[derive(Clone)]
struct KlogWriter {
    sink: std::sync::Arc<std::sync::Mutex<FileSink>>,
    stderr_from: tracing::Level,
}

/// One line's writer.
struct KlogLine {
    sink: std::sync::Arc<std::sync::Mutex<FileSink>>,
    also_stderr: bool,
}

impl std::io::Write for KlogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A full disk must not stop the process (the line still reaches stderr if it is severe), nor may a panic
        // while another thread held the lock end file logging for good.
        let _ = self.sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write(buf);
        if self.also_stderr {
            let _ = std::io::stderr().write_all(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for KlogWriter {
    type Writer = KlogLine;
    fn make_writer(&'a self) -> Self::Writer {
        KlogLine { sink: self.sink.clone(), also_stderr: false }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        KlogLine { sink: self.sink.clone(), also_stderr: *meta.level() <= self.stderr_from }
    }
}

/// What the klog flags ask of logging (made by `KlogFlags::log_settings`).
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `-v`.
    pub verbosity: u32,
    /// `--log-format`.
    pub format: LogFormat,
    /// Where lines go.
    pub destination: LogDestination,
    /// `--log-file` or `--log-dir` was given although lines go to stderr (worth a warning, as klog ignores them).
    pub unused_file_flags: bool,
}

/// Installs the global subscriber for the klog flags: verbosity, destination (see [`LogDestination`]) and
/// `--log-format`. Fails if the log file cannot be opened.
pub fn init_klog(settings: LogSettings) -> std::io::Result<()> {
    let LogSettings { verbosity, format, destination, unused_file_flags } = settings;
    match destination {
        LogDestination::Stderr => {
            init_format(verbosity, format);
            if unused_file_flags {
                tracing::warn!("--log-file and --log-dir are not used with --logtostderr=true (as in klog)");
            }
        }
        LogDestination::File { path, max_bytes, stderr_from } => {
            let file = FileSink::open(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("opening the log file {}: {e}", path.display())))?;
            let size = file.metadata().map(|m| m.len()).unwrap_or(0);
            let writer = KlogWriter {
                sink: std::sync::Arc::new(std::sync::Mutex::new(FileSink { path, file, size, max_bytes })),
                stderr_from,
            };
            install(verbosity, format, writer, false);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn severities_and_rotation() {
        assert_eq!(parse_severity("warning"), Some(tracing::Level::WARN));
        assert_eq!(parse_severity("2"), Some(tracing::Level::ERROR));
        assert_eq!(parse_severity("FATAL"), Some(tracing::Level::ERROR));
        assert_eq!(parse_severity("loud"), None);

        let dir = std::env::temp_dir().join(format!("klog-rotation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("x.log");
        let file = FileSink::open(&path).expect("open");
        let sink =
            std::sync::Arc::new(std::sync::Mutex::new(FileSink { path: path.clone(), file, size: 0, max_bytes: 10 }));
        let mut line = KlogLine { sink, also_stderr: false };
        line.write_all(b"123456\n").expect("write");
        line.write_all(b"abcdef\n").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "abcdef\n");
        assert_eq!(std::fs::read_to_string(dir.join("x.log.1")).expect("read"), "123456\n");
        let _ = std::fs::remove_dir_all(dir);
    }
}
