//! Values in the syntax Go's flag packages accept, so that operators can keep their reference command lines.

use crate::logging;
use std::time::Duration;

/// Why a Go duration did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {reason}")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Parses a duration as Go's `time.ParseDuration` does: a sequence of decimal numbers, each with an optional
/// fraction and a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), such as `1h0m0s`, `1.5h` or `300ms`. A bare
/// `0` is allowed. Negative durations are rejected: no flag of ours has a meaning for them.
pub fn parse_go_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError { input: input.to_string(), reason };
    let s = input.strip_prefix('+').unwrap_or(input);
    if let Some(magnitude) = s.strip_prefix('-') {
        // "-0" is zero; anything else negative has no meaning for our flags.
        return if !magnitude.is_empty() && magnitude.chars().all(|c| c == '0') {
            Ok(Duration::ZERO)
        } else {
            Err(err("negative"))
        };
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err("empty"));
    }
    let mut rest = s;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(|| err("missing unit"))?;
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(err("missing unit")),
            _ => return Err(err("unknown unit")),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(err("expected a number"));
        }
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| err("number too large"))? };
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(|| err("overflow"))?;
        let mut scale = unit_nanos;
        for d in frac.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos += u128::from(d - b'0') * scale;
        }
        total_nanos = total_nanos.checked_add(nanos).ok_or_else(|| err("overflow"))?;
        rest = tail;
    }
    u64::try_from(total_nanos).map(Duration::from_nanos).map_err(|_| err("overflow"))
}

/// Formats a duration the way Go prints one (`1h0m0s`, `30s`, `100ms`), for `--help` defaults and logs.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        let (v, unit) = if nanos < 1_000 {
            (nanos as f64, "ns")
        } else if nanos < 1_000_000 {
            (nanos as f64 / 1e3, "µs")
        } else {
            (nanos as f64 / 1e6, "ms")
        };
        return format!("{v}{unit}");
    }
    let secs = d.as_secs();
    let frac = d.subsec_nanos();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut seconds = s.to_string();
    if frac > 0 {
        let f = format!("{frac:09}");
        seconds = format!("{s}.{}", f.trim_end_matches('0'));
    }
    if h > 0 {
        format!("{h}h{m}m{seconds}s")
    } else if m > 0 {
        format!("{m}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

/// clap value parser for Go durations.
pub fn go_duration(s: &str) -> Result<Duration, String> {
    parse_go_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_syntax() {
        let cases = [
            ("0", 0),
            ("1h0m0s", 3_600_000_000_000u64),
            ("1h", 3_600_000_000_000),
            ("1.5h", 5_400_000_000_000),
            ("30s", 30_000_000_000),
            ("1m30s", 90_000_000_000),
            ("100ms", 100_000_000),
            ("300us", 300_000),
            ("300µs", 300_000),
            ("7ns", 7),
            ("0.5s", 500_000_000),
            (".5s", 500_000_000),
            ("+2s", 2_000_000_000),
        ];
        for (input, nanos) in cases {
            assert_eq!(parse_go_duration(input), Ok(Duration::from_nanos(nanos)), "{input}");
        }
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in ["", "1", "1x", "h", "1.2.3s", "-1s", "s1"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} should fail");
        }
        assert!(parse_go_duration("99999999999h").is_err());
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_go_duration(Duration::from_millis(100)), "100ms");
        assert_eq!(format_go_duration(Duration::ZERO), "0s");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
    }
}

/// Why a command line does not form a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    /// A flag's value is invalid, or flags conflict.
    #[error("{0}")]
    Invalid(String),
    /// A reference flag whose feature is not built yet.
    #[error(transparent)]
    NotSupported(#[from] NotSupported),
}

impl FlagError {
    /// An invalid value or combination, explained by `msg`.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// Checks the Kubernetes client flags both binaries take: `--kubeconfig` (empty: in-cluster) must name a file
/// that exists, and `--kube-api-content-type` must be one kube-apiserver speaks.
pub fn check_kube_client(kubeconfig: &str, content_type: &str) -> Result<(), FlagError> {
    if !kubeconfig.is_empty() && !std::path::Path::new(kubeconfig).exists() {
        return Err(FlagError::invalid(format!("checking --kubeconfig {kubeconfig:?}: no such file")));
    }
    match content_type {
        "application/vnd.kubernetes.protobuf" | "application/json" => Ok(()),
        other => Err(FlagError::invalid(format!(
            "--kube-api-content-type={other:?}: want application/vnd.kubernetes.protobuf or application/json"
        ))),
    }
}

/// Fails start-up for a reference flag this build does not implement yet, rather than silently ignoring it.
#[derive(Debug, thiserror::Error)]
#[error("not supported yet: --{flag}{detail}")]
pub struct NotSupported {
    /// The flag's name.
    pub flag: &'static str,
    /// Extra words (the value given, a hint).
    pub detail: String,
}

impl NotSupported {
    /// `--flag` is not supported.
    pub fn flag(flag: &'static str) -> Self {
        Self { flag, detail: String::new() }
    }
    /// `--flag=value` is not supported.
    pub fn value(flag: &'static str, value: impl std::fmt::Display) -> Self {
        Self { flag, detail: format!("={value}") }
    }
}

/// The klog flags the reference binaries accept. `--v` sets our log level; the destination flags behave as in
/// klog (stderr by default; with `--logtostderr=false`, a file, with errors also on stderr); the header-formatting
/// flags are accepted and have no effect (our log lines have their own format).
#[derive(Debug, Clone, clap::Args)]
pub struct KlogFlags {
    /// Log verbosity (klog -v): up to 4 logs at info, 5-6 at debug, 7+ at trace. RUST_LOG overrides it.
    #[arg(short = 'v', long = "v", default_value_t = 4, value_name = "N")]
    pub v: u32,
    /// Per-module verbosity (klog); accepted, but only --v and RUST_LOG set levels.
    #[arg(long, value_name = "pattern=N,...", hide = true)]
    pub vmodule: Option<String>,
    /// Log to standard error instead of files (klog; default true: --log-file and --log-dir are then unused).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", hide = true)]
    pub logtostderr: bool,
    /// With --logtostderr=false: log to standard error as well as to the file (klog).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", hide = true)]
    pub alsologtostderr: bool,
    /// With --logtostderr=false and no --log-file: write `<dir>/<program>.log` (klog writes one file per
    /// severity there; we write one).
    #[arg(long, hide = true)]
    pub log_dir: Option<String>,
    /// With --logtostderr=false: the log file (klog).
    #[arg(long, hide = true)]
    pub log_file: Option<String>,
    /// Size in MB at which the log file is rotated to `<file>.1` (klog; 0: no limit).
    #[arg(long, default_value_t = 1800, hide = true)]
    pub log_file_max_size: u64,
    /// klog header formatting; accepted, no effect.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub add_dir_header: Option<bool>,
    /// klog header formatting; accepted, no effect.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub skip_headers: Option<bool>,
    /// klog header formatting; accepted, no effect.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub skip_log_headers: Option<bool>,
    /// klog file output; accepted, no effect.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub one_output: Option<bool>,
    /// With --logtostderr=false: lines at or above this severity also go to stderr (klog: INFO, WARNING,
    /// ERROR or FATAL, or 0-3; default ERROR).
    #[arg(long, hide = true)]
    pub stderrthreshold: Option<String>,
    /// klog; accepted, no effect.
    #[arg(long, hide = true)]
    pub alsologtostderrthreshold: Option<String>,
    /// klog; accepted, no effect.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub legacy_stderr_threshold_behavior: Option<bool>,
    /// klog; accepted, no effect.
    #[arg(long, hide = true)]
    pub log_backtrace_at: Option<String>,
    /// Log line format: text; json (one object per line, with agent_id/dial_id/connect_id fields); or klog (the
    /// reference's klog lines, `I1202 08:00:00.000000   12345 file.rs:42] "message" key="value"`, time in UTC).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: logging::LogFormat,
}

impl KlogFlags {
    /// Checks the klog flags' values.
    pub fn check(&self) -> Result<(), NotSupported> {
        if let Some(t) = &self.stderrthreshold
            && logging::parse_severity(t).is_none()
        {
            return Err(NotSupported::value("stderrthreshold", t));
        }
        Ok(())
    }

    /// What logging these flags ask for, for [`logging::init_klog`].
    pub fn log_settings(&self, program: &str) -> logging::LogSettings {
        logging::LogSettings {
            verbosity: self.v,
            format: self.log_format,
            destination: self.destination(program),
            unused_file_flags: self.logtostderr && (self.log_file.is_some() || self.log_dir.is_some()),
        }
    }

    /// Where log lines go, as klog would send them.
    pub fn destination(&self, program: &str) -> logging::LogDestination {
        use logging::LogDestination;
        if self.logtostderr {
            return LogDestination::Stderr;
        }
        let file = match (&self.log_file, &self.log_dir) {
            (Some(f), _) if !f.is_empty() => std::path::PathBuf::from(f),
            (_, Some(d)) if !d.is_empty() => std::path::Path::new(d).join(format!("{program}.log")),
            _ => std::env::temp_dir().join(format!("{program}.log")),
        };
        let threshold = if self.alsologtostderr {
            tracing::Level::TRACE
        } else {
            self.stderrthreshold.as_deref().and_then(logging::parse_severity).unwrap_or(tracing::Level::ERROR)
        };
        LogDestination::File {
            path: file,
            max_bytes: self.log_file_max_size.saturating_mul(1 << 20),
            stderr_from: threshold,
        }
    }
}

/// Rewrites `--flag_name` to `--flag-name` as pflag's normalization does for klog flags, and `-flag=x` Go-style
/// single-dash long flags to `--flag=x`, so reference command lines parse unchanged.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest_are_values = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || rest_are_values {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            rest_are_values = true;
            out.push(arg);
            continue;
        }
        let fixed = if let Some(body) = arg.strip_prefix("--") {
            let (name, value) = body.split_once('=').map(|(n, v)| (n, Some(v))).unwrap_or((body, None));
            let name = name.replace('_', "-");
            match value {
                Some(v) => format!("--{name}={v}"),
                None => format!("--{name}"),
            }
        } else if let Some(body) = arg.strip_prefix('-') {
            // Go's flag package allows `-name`; pflag only for shorthands like `-v`. Keep `-v=4` and `-h`.
            let name = body.split('=').next().unwrap_or("");
            if name.len() > 1 && !name.starts_with('-') { format!("--{}", body.replacen('_', "-", 1)) } else { arg }
        } else {
            arg
        };
        out.push(fixed);
    }
    out
}

#[cfg(test)]
mod arg_tests {
    use super::normalize_args;

    #[test]
    fn normalizes_go_style_args() {
        let args = ["prog", "--log_file_max_size=3", "-v=5", "--uds-name", "/a_b", "-mode=grpc", "--", "--x_y"];
        let got = normalize_args(args.iter().map(|s| s.to_string()));
        assert_eq!(got, ["prog", "--log-file-max-size=3", "-v=5", "--uds-name", "/a_b", "--mode=grpc", "--", "--x_y"]);
    }
}
