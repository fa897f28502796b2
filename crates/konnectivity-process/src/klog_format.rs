//! klog's text format (`--log-format=klog`), for operators whose log pipelines already parse the reference's
//! lines:
//!
//! ```text
//! I1202 08:00:00.000123   12345 server.rs:42] "agent connected" agent_id="a-1" streams=3
//! ```
//!
//! * The severity letter: `E` for errors, `W` for warnings, `I` for everything else (klog has no debug level;
//!   its `-v` levels are all `I`).
//! * Month and day, then the time with microseconds, in **UTC** (klog uses the local zone; containers run in UTC,
//!   and we do not read the zone database).
//! * The **process id**, right-aligned in seven columns, as klog prints it (klog's header calls the field
//!   "threadid" after glog, but Go's klog writes `os.Getpid()`).
//! * The source file's base name and line, then `] `.
//! * With fields, klog's structured (`InfoS`) form: the message quoted, then `key=value` pairs: the fields of
//!   the enclosing spans (outermost first, as klog puts a logger's `WithValues` before a call's pairs), then the
//!   event's own. Strings and other formatted values are quoted and escaped as Go's `strconv.Quote` does;
//!   integers, floats and booleans are bare.
//! * Without fields, klog's printf (`Infof`) form: the message bare, so `FLAG: --v="4"` reads as in the
//!   reference (see [`write_message`]).
//!
//! One deliberate difference: klog prints a string value that holds a newline as a multi-line `key=<` block. We
//! escape it (`\n`) instead, so that every record stays one line and a line-based parser never sees a fragment.

use std::fmt::Write as _;
use time::OffsetDateTime;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The `FormatEvent` that writes klog text lines (see the module documentation).
#[derive(Debug, Clone)]
pub struct KlogFormat {
    pid: u32,
    clock: fn() -> OffsetDateTime,
}

impl Default for KlogFormat {
    fn default() -> Self {
        Self { pid: std::process::id(), clock: OffsetDateTime::now_utc }
    }
}

impl KlogFormat {
    /// Lines with this process's id and the current UTC time.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The `FormatFields` for span fields in klog lines: ` key=value` pairs, escaped as in events.
#[derive(Debug, Clone, Copy, Default)]
pub struct KlogFields;

impl<'w> FormatFields<'w> for KlogFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = FieldVisitor::default();
        fields.record(&mut visitor);
        // A span's own `message` (rare) is just another pair here.
        if let Some(message) = visitor.message.take() {
            push_pair(&mut visitor.pairs, "message", &go_quote(&message));
        }
        writer.write_str(visitor.pairs.trim_start())
    }
}

impl<S, N> FormatEvent<S, N> for KlogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut visitor = FieldVisitor::default();
        event.record(&mut visitor);
        let meta = event.metadata();
        // Events bridged from the `log` crate carry their real place in `log.file` / `log.line` fields.
        let file = visitor.log_file.as_deref().or(meta.file());
        let line = visitor.log_line.or(meta.line());
        let mut out = String::with_capacity(128);
        write_header(&mut out, meta.level(), (self.clock)(), self.pid, file, line);
        let mut pairs = String::new();
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.fields.is_empty()
                {
                    pairs.push(' ');
                    pairs.push_str(&fields.fields);
                }
            }
        }
        pairs.push_str(&visitor.pairs);
        write_message(&mut out, visitor.message.as_deref().unwrap_or(""), !pairs.is_empty());
        out.push_str(&pairs);
        out.push('\n');
        writer.write_str(&out)
    }
}

/// klog's severity letter for a tracing level.
pub fn severity_letter(level: &Level) -> char {
    match *level {
        Level::ERROR => 'E',
        Level::WARN => 'W',
        _ => 'I',
    }
}

/// Writes klog's header, `Lmmdd hh:mm:ss.uuuuuu ppppppp file:line] `. An unknown place is `???:1`, as klog
/// writes it.
pub fn write_header(
    out: &mut String,
    level: &Level,
    at: OffsetDateTime,
    pid: u32,
    file: Option<&str>,
    line: Option<u32>,
) {
    let (file, line) = match file {
        Some(f) => (f.rsplit(['/', '\\']).next().unwrap_or(f), line.unwrap_or(0)),
        None => ("???", 1),
    };
    let _ = write!(
        out,
        "{}{:02}{:02} {:02}:{:02}:{:02}.{:06} {pid:>7} {file}:{line}] ",
        severity_letter(level),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond(),
    );
}

/// Writes a message as klog does: quoted when pairs follow (`InfoS`); bare, as `Infof` writes it, when none do,
/// with control and other non-printing characters still escaped so that the record stays on one line. A bare
/// message that is empty or starts with a quote is quoted, so that a parser can always tell the two forms apart.
pub fn write_message(out: &mut String, message: &str, structured: bool) {
    if structured || message.is_empty() || message.starts_with('"') {
        out.push_str(&go_quote(message));
    } else {
        escape_into(out, message, false);
    }
}

/// Quotes `s` as Go's `strconv.Quote` does: `"` and `\` escaped, `\a \b \f \n \r \t \v` by name, other ASCII
/// controls as `\xNN`, and other non-printing characters (C1 controls, separators other than the space,
/// invisible format characters such as bidi overrides) as `\uNNNN`. Printable non-ASCII text is kept.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    escape_into(&mut out, s, true);
    out.push('"');
    out
}

/// `strconv.Quote`'s escaping without the quotes; `"` and `\` are escaped only if `quoted`.
fn escape_into(out: &mut String, s: &str, quoted: bool) {
    for c in s.chars() {
        match c {
            '"' if quoted => out.push_str("\\\""),
            '\\' if quoted => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if !is_go_printable(c) => {
                let _ = if (c as u32) < 0x1_0000 {
                    write!(out, "\\u{:04x}", c as u32)
                } else {
                    write!(out, "\\U{:08x}", c as u32)
                };
            }
            c => out.push(c),
        }
    }
}

/// An approximation of Go's `unicode.IsPrint` for non-ASCII characters: controls, separators other than the
/// ASCII space, and the common invisible format characters are not printable.
fn is_go_printable(c: char) -> bool {
    if c.is_ascii() {
        return true;
    }
    !(c.is_control()
        || c.is_whitespace()
        || matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}')
        || matches!(c, '\u{2066}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}'))
}

fn push_pair(out: &mut String, key: &str, value: &str) {
    out.push(' ');
    out.push_str(key);
    out.push('=');
    out.push_str(value);
}

/// Collects an event's message and its other fields as klog pairs (each with a leading space).
#[derive(Default)]
struct FieldVisitor {
    message: Option<String>,
    pairs: String,
    log_file: Option<String>,
    log_line: Option<u32>,
}

impl FieldVisitor {
    fn bare(&mut self, field: &Field, value: &dyn std::fmt::Display) {
        if field.name() == "log.line" {
            self.log_line = value.to_string().parse().ok();
        } else if !field.name().starts_with("log.") {
            push_pair(&mut self.pairs, field.name(), &value.to_string());
        }
    }
}

impl Visit for FieldVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = Some(value.to_string()),
            "log.file" => self.log_file = Some(value.to_string()),
            name if name.starts_with("log.") => {}
            name => push_pair(&mut self.pairs, name, &go_quote(value)),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%display` values arrive here too, as does a formatted message; klog quotes Stringers, so we quote
        // everything formatted.
        self.record_str(field, &format!("{value:?}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_str(field, &value.to_string());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field, &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.bare(field, &value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.bare(field, &value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.bare(field, &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.bare(field, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field, &value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[test]
    fn quotes_like_go_strconv_quote() {
        let cases = [
            ("plain", r#""plain""#),
            (r#"say "hi""#, r#""say \"hi\"""#),
            (r"C:\dir", r#""C:\\dir""#),
            ("a\nb\r\tc", r#""a\nb\r\tc""#),
            ("\u{7}\u{8}\u{b}\u{c}", r#""\a\b\v\f""#),
            ("nul\u{0}esc\u{1b}del\u{7f}", r#""nul\x00esc\x1bdel\x7f""#),
            ("é ü 日本", "\"é ü 日本\""),
            ("nel\u{85}nbsp\u{a0}ls\u{2028}", r#""nel\u0085nbsp\u00a0ls\u2028""#),
            ("bidi\u{202e}zw\u{200b}bom\u{feff}", r#""bidi\u202ezw\u200bbom\ufeff""#),
            ("", r#""""#),
        ];
        for (input, want) in cases {
            assert_eq!(go_quote(input), want, "{input:?}");
        }
    }

    #[test]
    fn header_matches_klog() {
        let at = time::macros::datetime!(2026-12-02 08:00:00.000123 UTC);
        let mut out = String::new();
        write_header(&mut out, &Level::INFO, at, 12345, Some("crates/x/src/server.rs"), Some(42));
        assert_eq!(out, "I1202 08:00:00.000123   12345 server.rs:42] ");
        out.clear();
        write_header(&mut out, &Level::DEBUG, at, 7, None, None);
        assert_eq!(out, "I1202 08:00:00.000123       7 ???:1] ");
        out.clear();
        let at = time::macros::datetime!(2026-01-09 23:59:59.999999 UTC);
        write_header(&mut out, &Level::WARN, at, 1234567, Some("a.rs"), Some(1));
        assert_eq!(out, "W0109 23:59:59.999999 1234567 a.rs:1] ");
        out.clear();
        write_header(&mut out, &Level::ERROR, at, 1, Some("b.rs"), Some(9));
        assert!(out.starts_with("E0109 "));
        assert_eq!(severity_letter(&Level::TRACE), 'I');
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn fixed_clock() -> OffsetDateTime {
        time::macros::datetime!(2026-12-02 08:00:00.000001 UTC)
    }

    #[test]
    fn golden_lines() {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_writer(buffer.clone())
            .with_ansi(false)
            .fmt_fields(KlogFields)
            .event_format(KlogFormat { pid: 4242, clock: fixed_clock })
            .finish();
        let mut lines = Vec::new();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", agent_id = "agent \"1\"", connect_id = 7u64);
            let _entered = span.enter();
            let inner = tracing::info_span!("dial", dial_id = 3i64);
            let _inner = inner.enter();
            tracing::info!(key = "value", other = 3, ok = true, ratio = 0.5, "dial\tdone");
            lines.push(line!() - 1);
            tracing::warn!(peer = %"10.0.0.1:5", err = ?"refused\n", "a {} message", "formatted");
            lines.push(line!() - 1);
            drop(_inner);
            tracing::error!(value = "x");
            lines.push(line!() - 1);
            tracing::debug!("debug is I");
            lines.push(line!() - 1);
            drop(_entered);
            tracing::info!("FLAG: --name=\"value\" \\ two\nlines");
            lines.push(line!() - 1);
            tracing::info!("\"starts with a quote\"");
            lines.push(line!() - 1);
        });
        let got = String::from_utf8(buffer.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
            .unwrap_or_default();
        let want = [
            format!(
                "I1202 08:00:00.000001    4242 klog_format.rs:{}] \"dial\\tdone\" agent_id=\"agent \\\"1\\\"\" \
                 connect_id=7 dial_id=3 key=\"value\" other=3 ok=true ratio=0.5\n",
                lines[0]
            ),
            format!(
                "W1202 08:00:00.000001    4242 klog_format.rs:{}] \"a formatted message\" agent_id=\"agent \
                 \\\"1\\\"\" connect_id=7 dial_id=3 peer=\"10.0.0.1:5\" err=\"\\\"refused\\\\n\\\"\"\n",
                lines[1]
            ),
            format!(
                "E1202 08:00:00.000001    4242 klog_format.rs:{}] \"\" agent_id=\"agent \\\"1\\\"\" connect_id=7 \
                 value=\"x\"\n",
                lines[2]
            ),
            format!(
                "I1202 08:00:00.000001    4242 klog_format.rs:{}] \"debug is I\" agent_id=\"agent \\\"1\\\"\" \
                 connect_id=7\n",
                lines[3]
            ),
            format!(
                "I1202 08:00:00.000001    4242 klog_format.rs:{}] FLAG: --name=\"value\" \\ two\\nlines\n",
                lines[4]
            ),
            format!("I1202 08:00:00.000001    4242 klog_format.rs:{}] \"\\\"starts with a quote\\\"\"\n", lines[5]),
        ]
        .concat();
        assert_eq!(got, want);
    }
}
