//! Test support for konnectivity-rs, shared by the integration tests (`tests/it`) and the demo: HTTP and TCP
//! targets, a builder that starts a real server and agent on loopback (`stack`), a fake agent, network
//! namespaces, a real Kubernetes control plane in isolated networks (`controlplane`), and waits (`eventually!`,
//! [`steady`]). The fixtures the benchmark shares (PKI, temporary directories, child processes, free ports) are
//! in `konnectivity-testkit`.
// The workspace lints apply (Cargo.toml), but this is test support: a fixture that cannot do its job panics, and
// that panic is the test's failure, so `expect` is how it reports.
#![allow(clippy::expect_used)]

pub mod controlplane;
pub mod fake_agent;
pub mod http;
pub mod metrics;
pub mod netns;
pub mod stack;
pub mod targets;

/// Waits until a condition holds, polling every 20 ms, for at most `$secs` seconds; panics with the message
/// (and the condition) if it never does. Use it instead of sleeping.
#[macro_export]
macro_rules! eventually {
    ($secs:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64($secs as f64);
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!("condition `{}` not met within {}s: {}", stringify!($cond), $secs, format!($($msg)+));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

/// Waits until `read` gives the same value twice, 100 ms apart, for at most `within`, and returns it (or the
/// last value read). For a count no event announces, such as a process's open descriptors while its last
/// connections close: a baseline taken from it is a settled one, not whatever a fixed pause happened to catch.
pub async fn steady<T: PartialEq>(within: std::time::Duration, mut read: impl FnMut() -> T) -> T {
    let deadline = std::time::Instant::now() + within;
    let mut last = read();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = read();
        if now == last || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Number of open file descriptors of this process (Linux).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// Resident memory of this process in bytes (Linux: `/proc/self/statm`'s resident pages, 4 KiB each).
pub fn resident_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
