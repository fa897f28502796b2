//! CPU profiles in pprof's protobuf format (`/debug/pprof/profile?seconds=N`), readable by `go tool pprof`,
//! behind `--enable-profiling` as in the reference.
//!
//! Sampling uses the pprof crate (SIGPROF, one profile at a time per process); the profile is encoded here with
//! prost from the messages of pprof's `profile.proto` that a CPU profile needs.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Sampling frequency (Hz), as Go's default CPU profile rate.
const FREQUENCY: i32 = 100;
/// Longest profile accepted.
pub const MAX_SECONDS: u64 = 300;

/// Why a profile could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Another profile is running, or the profiler could not start.
    #[error("profiler: {0}")]
    Profiler(String),
    /// The profiling task failed.
    #[error("profiling task: {0}")]
    Task(String),
}

/// Samples this process's CPU for `duration` and returns the profile (pprof protobuf).
pub async fn cpu_profile(duration: Duration) -> Result<Vec<u8>, ProfileError> {
    tokio::task::spawn_blocking(move || {
        let builder = pprof::ProfilerGuardBuilder::default().frequency(FREQUENCY);
        // pprof skips samples taken inside these libraries (unwinding through them can crash) where it can tell
        // them apart: on the architectures it offers the blocklist for.
        #[cfg(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64",
            target_arch = "loongarch64"
        ))]
        let builder = builder.blocklist(&["libc", "libgcc", "pthread", "vdso"]);
        let guard = builder.build().map_err(|e| ProfileError::Profiler(e.to_string()))?;
        let started = SystemTime::now();
        std::thread::sleep(duration);
        let report = guard.report().build().map_err(|e| ProfileError::Profiler(e.to_string()))?;
        Ok(encode(&report, started, duration))
    })
    .await
    .map_err(|e| ProfileError::Task(e.to_string()))?
}

#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    time_nanos: i64,
    #[prost(int64, tag = "10")]
    duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    period: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
    #[prost(int64, tag = "2")]
    line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
    #[prost(int64, tag = "3")]
    system_name: i64,
    #[prost(int64, tag = "4")]
    filename: i64,
}

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn get(&mut self, s: &str) -> i64 {
        if self.table.is_empty() {
            self.table.push(String::new());
            self.index.insert(String::new(), 0);
        }
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

fn encode(report: &pprof::Report, started: SystemTime, duration: Duration) -> Vec<u8> {
    use prost::Message;
    let mut strings = Strings::default();
    strings.get("");
    let period = 1_000_000_000 / i64::from(FREQUENCY);
    let sample_type = vec![
        ValueType { r#type: strings.get("samples"), unit: strings.get("count") },
        ValueType { r#type: strings.get("cpu"), unit: strings.get("nanoseconds") },
    ];
    let period_type = Some(ValueType { r#type: strings.get("cpu"), unit: strings.get("nanoseconds") });
    let mut functions: HashMap<(String, String), u64> = HashMap::new();
    let mut function_list = Vec::new();
    let mut locations: HashMap<Vec<(u64, i64)>, u64> = HashMap::new();
    let mut location_list = Vec::new();
    let mut samples = Vec::new();
    for (frames, count) in &report.data {
        let mut location_ids = Vec::with_capacity(frames.frames.len());
        // Leaf first, as pprof expects.
        for frame in &frames.frames {
            let mut lines = Vec::new();
            for symbol in frame {
                let name = symbol.name();
                let file = symbol.filename().to_string();
                let key = (name.clone(), file.clone());
                let id = match functions.get(&key) {
                    Some(id) => *id,
                    None => {
                        let id = function_list.len() as u64 + 1;
                        let n = strings.get(&name);
                        function_list.push(Function { id, name: n, system_name: n, filename: strings.get(&file) });
                        functions.insert(key, id);
                        id
                    }
                };
                lines.push((id, i64::from(symbol.lineno())));
            }
            let id = match locations.get(&lines) {
                Some(id) => *id,
                None => {
                    let id = location_list.len() as u64 + 1;
                    location_list.push(Location {
                        id,
                        line: lines.iter().map(|(f, l)| Line { function_id: *f, line: *l }).collect(),
                    });
                    locations.insert(lines, id);
                    id
                }
            };
            location_ids.push(id);
        }
        let count = *count as i64;
        samples.push(Sample { location_id: location_ids, value: vec![count, count * period] });
    }
    let profile = Profile {
        sample_type,
        sample: samples,
        location: location_list,
        function: function_list,
        string_table: strings.table,
        time_nanos: started.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0),
        duration_nanos: duration.as_nanos() as i64,
        period_type,
        period,
    };
    profile.encode_to_vec()
}
