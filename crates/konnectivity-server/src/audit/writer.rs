//! The audit log's writer thread: takes records off the bounded queue, formats them as JSON lines and writes
//! them in batches to stdout or to a file that rotates by size. It is the only place that touches the disk, so
//! a slow or failing disk costs the writer, never the traffic; lines that cannot be written are counted.

use super::{AgentRecord, AuditedAgent, Event, Line, Record};
use prometheus::IntCounter;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{SystemTime, UNIX_EPOCH};

/// Most bytes gathered from the queue before they are written (a batch is written sooner when the queue is
/// empty).
const BATCH_BYTES: usize = 256 * 1024;

/// Where the lines go.
pub(crate) enum Output {
    /// The process's standard output.
    Stdout,
    /// A file, rotated by size.
    File(RotatingFile),
    /// Any writer (tests).
    #[cfg(test)]
    Custom(Box<dyn Write + Send>),
}

/// An append-only file that is renamed to `<path>.1` (older ones shifting to `.2` … `.N`) once it would grow
/// past `max_size` bytes.
pub(crate) struct RotatingFile {
    path: PathBuf,
    /// 0: never rotate.
    max_size: u64,
    max_backups: u32,
    /// `None` after a failure, until it can be opened again.
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
}

impl RotatingFile {
    /// Opens (creating, appending) `path`; fails if it cannot be, so a bad path stops the server at start.
    pub(crate) fn open(path: &Path, max_size: u64, max_backups: u32) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self { path: path.to_path_buf(), max_size, max_backups, file: Some(file), size })
    }

    /// Whether a line of `line` bytes, after `pending` bytes not yet written, would take a non-empty file past
    /// its size limit.
    fn must_rotate_before(&self, pending: usize, line: usize) -> bool {
        let filled = self.size + pending as u64;
        self.max_size > 0 && filled > 0 && filled + line as u64 > self.max_size
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let f = open_append(&self.path)?;
                self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                self.file.insert(f)
            }
        };
        match file.write_all(data) {
            Ok(()) => {
                self.size += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Reopen next time: the file may have been removed or its disk remounted.
                self.file = None;
                Err(e)
            }
        }
    }

    /// `<path>` becomes `<path>.1`, `.1` becomes `.2`, …; what would become `.N+1` is overwritten away. With no
    /// backups the file is simply started afresh.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        self.size = 0;
        if self.max_backups == 0 {
            remove_if_present(&self.path)?;
        } else {
            for n in (1..self.max_backups).rev() {
                rename_if_present(&backup(&self.path, n), &backup(&self.path, n + 1))?;
            }
            rename_if_present(&self.path, &backup(&self.path, 1))?;
        }
        let file = open_append(&self.path)?;
        self.file = Some(file);
        Ok(())
    }
}

/// `<path>.<n>`.
pub(crate) fn backup(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Destinations and client identities are not for everyone: owner read/write only.
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

fn rename_if_present(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The writer thread's state.
pub(crate) struct Writer {
    pub(crate) output: Output,
    pub(crate) server_id: String,
    /// Lines lost because the output could not be written.
    pub(crate) dropped: IntCounter,
    batch: Vec<u8>,
    batch_lines: u64,
    /// Whether the last write failed (to log the change, not every failure).
    failing: bool,
}

impl Writer {
    pub(crate) fn new(output: Output, server_id: String, dropped: IntCounter) -> Self {
        Self { output, server_id, dropped, batch: Vec::new(), batch_lines: 0, failing: false }
    }

    /// Writes every record until the queue is closed (all senders gone) and empty.
    pub(crate) fn run(mut self, queue: Receiver<Line>) {
        while let Ok(first) = queue.recv() {
            self.add(&first);
            while self.batch.len() < BATCH_BYTES {
                match queue.try_recv() {
                    Ok(record) => self.add(&record),
                    Err(_) => break,
                }
            }
            self.flush();
        }
        self.flush();
    }

    fn add(&mut self, record: &Line) {
        let line = match record {
            Line::Tunnel(r) => r.json_line(&self.server_id),
            Line::Agent(r) => r.json_line(&self.server_id),
        };
        if let Output::File(file) = &self.output
            && file.must_rotate_before(self.batch.len(), line.len())
        {
            self.flush();
            if let Output::File(file) = &mut self.output
                && let Err(e) = file.rotate()
            {
                tracing::warn!(path = %file.path.display(), "audit log rotation failed: {e}");
            }
        }
        self.batch.extend_from_slice(line.as_bytes());
        self.batch_lines += 1;
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let result = match &mut self.output {
            Output::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&self.batch).and_then(|()| out.flush())
            }
            Output::File(file) => file.write(&self.batch),
            #[cfg(test)]
            Output::Custom(w) => w.write_all(&self.batch).and_then(|()| w.flush()),
        };
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("audit log is being written again");
            }
            Ok(()) => {}
            Err(e) => {
                self.dropped.inc_by(self.batch_lines);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!("audit log write failed, {} lines dropped (and counted): {e}", self.batch_lines);
                }
            }
        }
        self.batch.clear();
        self.batch_lines = 0;
    }
}

impl Record {
    /// The record as one JSON line (with its newline), fields in a fixed order.
    pub(crate) fn json_line(&self, server_id: &str) -> String {
        let mut out = String::with_capacity(384);
        out.push_str("{\"time\":");
        push_str(&mut out, &rfc3339_millis(self.time));
        out.push_str(",\"event\":");
        push_str(&mut out, self.event.as_str());
        out.push_str(",\"server_id\":");
        push_str(&mut out, server_id);
        out.push_str(",\"frontend\":{\"mode\":");
        push_str(&mut out, self.mode);
        out.push_str(",\"transport\":");
        push_str(&mut out, self.client.transport());
        match &self.client {
            super::ClientIdentity::Uds(Some(cred)) => {
                out.push_str(&format!(",\"uid\":{},\"gid\":{}", cred.uid(), cred.gid()));
                if let Some(pid) = cred.pid() {
                    out.push_str(&format!(",\"pid\":{pid}"));
                }
            }
            super::ClientIdentity::Uds(None) => {}
            super::ClientIdentity::Tcp { addr, .. } => {
                out.push_str(",\"peer\":");
                push_str(&mut out, &addr.to_string());
                if let Some(subject) = self.client.subject() {
                    out.push_str(",\"subject\":");
                    push_str(&mut out, &subject);
                }
            }
        }
        out.push_str("},\"destination\":");
        push_str(&mut out, &self.destination);
        if let Some(agent) = &self.agent {
            push_agent(&mut out, agent);
        }
        out.push_str(&format!(",\"dial_id\":{}", self.dial_id));
        if let Some(connect_id) = self.connect_id {
            out.push_str(&format!(",\"connect_id\":{connect_id}"));
        }
        if let Some(reason) = self.reason {
            out.push_str(",\"reason\":");
            push_str(&mut out, reason);
        }
        if let Some(error) = &self.error {
            out.push_str(",\"error\":");
            push_str(&mut out, error);
        }
        if self.event == Event::Close {
            out.push_str(&format!(
                ",\"bytes_client_to_target\":{},\"bytes_target_to_client\":{}",
                self.bytes_client_to_target, self.bytes_target_to_client
            ));
        }
        out.push_str(&format!(",\"duration_ms\":{:.3}}}\n", self.duration.as_secs_f64() * 1000.0));
        out
    }
}

/// The agent's fields: `agent_id`, `agent_peer`, `agent_credential`, then `agent_identity` and `agent_node` when
/// the credential has them.
fn push_agent(out: &mut String, agent: &AuditedAgent) {
    out.push_str(",\"agent_id\":");
    push_str(out, &agent.id);
    out.push_str(",\"agent_peer\":");
    push_str(out, &agent.peer);
    out.push_str(",\"agent_credential\":");
    push_str(out, agent.credential);
    if !agent.identity.is_empty() {
        out.push_str(",\"agent_identity\":");
        push_str(out, &agent.identity);
    }
    if let Some(node) = &agent.node {
        out.push_str(",\"agent_node\":");
        push_str(out, node);
    }
}

impl AgentRecord {
    /// The record as one JSON line (with its newline).
    pub(crate) fn json_line(&self, server_id: &str) -> String {
        let mut out = String::with_capacity(256);
        out.push_str("{\"time\":");
        push_str(&mut out, &rfc3339_millis(self.time));
        out.push_str(",\"event\":");
        push_str(&mut out, Event::AgentRefused.as_str());
        out.push_str(",\"server_id\":");
        push_str(&mut out, server_id);
        push_agent(&mut out, &self.agent);
        out.push_str(",\"reason\":");
        push_str(&mut out, self.reason);
        out.push_str(",\"error\":");
        push_str(&mut out, &self.error);
        out.push_str("}\n");
        out
    }
}

/// Characters written as `\uXXXX` although JSON allows them raw: control characters (C0, DEL and C1), the line
/// and paragraph separators, and the bidirectional controls, which would let a client-chosen string (a
/// destination, a certificate subject) make a log line read differently on a terminal or in a viewer than it is.
fn needs_escape(c: char) -> bool {
    let n = u32::from(c);
    n < 0x20
        || (0x7f..=0x9f).contains(&n)
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{061c}' | '\u{200e}' | '\u{200f}')
        || (0x202a..=0x202e).contains(&n)
        || (0x2066..=0x2069).contains(&n)
}

/// Appends `s` as a JSON string literal.
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// RFC 3339 in UTC with milliseconds: `2025-01-31T23:59:59.123Z`.
pub(crate) fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let at = |secs: u64, ms: u64| rfc3339_millis(UNIX_EPOCH + Duration::from_millis(secs * 1000 + ms));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.007Z");
        assert_eq!(at(1_700_000_000, 123), "2023-11-14T22:13:20.123Z");
        assert_eq!(at(4_107_542_399, 999), "2100-02-28T23:59:59.999Z");
        assert_eq!(at(1_709_251_199, 0), "2024-02-29T23:59:59.000Z");
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        push_str(&mut s, "a\"b\\c\n\u{1}é");
        assert_eq!(s, r#""a\"b\\c\n\u0001é""#);
        let v: serde_json::Value = serde_json::from_str(&s).expect("valid JSON");
        assert_eq!(v, "a\"b\\c\n\u{1}é");
        let tricky = "evil\u{202e}gpj.exe\u{85}\u{9b}[31m\u{7f}\u{2066}x\u{2069}";
        let mut s = String::new();
        push_str(&mut s, tricky);
        assert_eq!(s, r#""evil\u202egpj.exe\u0085\u009b[31m\u007f\u2066x\u2069""#);
        let v: serde_json::Value = serde_json::from_str(&s).expect("valid JSON");
        assert_eq!(v, tricky, "escaping loses nothing");
    }
}
