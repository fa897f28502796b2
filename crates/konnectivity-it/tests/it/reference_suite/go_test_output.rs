//! Reads what a Go test binary run with `-test.v` printed: which tests ran, how each ended, how long it took
//! and what it logged. The output may have other processes' lines mixed in (the suite forwards the agents'
//! stdout and stderr into its own); only lines of the shapes below count.
//!
//! ```text
//! === RUN   TestName            a test (or TestName/subtest) starts; === CONT / === NAME: its output resumes
//!     proxy_test.go:210: text   something the running test logged (t.Log, t.Error, t.Fatal)
//! --- FAIL: TestName (1.23s)    how it ended: PASS, FAIL or SKIP; subtests indented by four spaces a level
//! PASS | FAIL                   the binary's summary, last, when it ran to the end
//! ```

/// How a test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// One test's (or subtest's) result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `TestName` or `TestName/subtest`.
    pub name: String,
    pub verdict: Verdict,
    pub seconds: f64,
    /// What it logged, one line each (`file_test.go:123: text`).
    pub log: Vec<String>,
}

/// Everything one run printed about its tests.
#[derive(Debug, Default)]
pub struct Run {
    /// In the order they ended.
    pub outcomes: Vec<Outcome>,
    /// Tests that started and never ended (the binary panicked or timed out while they ran).
    pub unfinished: Vec<String>,
    /// The binary's own summary line: `Some(true)` for PASS, `Some(false)` for FAIL, `None` if it printed none.
    pub summary: Option<bool>,
}

impl Run {
    /// The outcome of `name`, if it ended.
    pub fn outcome(&self, name: &str) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| o.name == name)
    }
}

/// Parses the output of a `-test.v` run.
pub fn parse(output: &str) -> Run {
    let mut run = Run::default();
    let mut started: Vec<String> = Vec::new();
    let mut logs: Vec<(String, Vec<String>)> = Vec::new();
    let mut current: Option<String> = None;
    for line in output.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = ["=== RUN", "=== CONT", "=== NAME"].iter().find_map(|p| line.strip_prefix(p)) {
            let name = rest.trim().to_string();
            if line.starts_with("=== RUN") && !started.contains(&name) {
                started.push(name.clone());
            }
            current = Some(name);
        } else if let Some((verdict, rest)) =
            [("--- PASS: ", Verdict::Pass), ("--- FAIL: ", Verdict::Fail), ("--- SKIP: ", Verdict::Skip)]
                .iter()
                .find_map(|(p, v)| trimmed.strip_prefix(p).map(|rest| (*v, rest)))
            && let Some((name, seconds)) = name_and_seconds(rest)
        {
            let log = logs.iter().position(|(n, _)| *n == name).map(|i| logs.remove(i).1).unwrap_or_default();
            started.retain(|s| *s != name);
            run.outcomes.push(Outcome { name, verdict, seconds, log });
        } else if is_test_log_line(trimmed)
            && let Some(name) = &current
        {
            match logs.iter_mut().find(|(n, _)| n == name) {
                Some((_, lines)) => lines.push(trimmed.to_string()),
                None => logs.push((name.clone(), vec![trimmed.to_string()])),
            }
        } else if line == "PASS" || line == "FAIL" {
            run.summary = Some(line == "PASS");
        }
    }
    run.unfinished = started;
    run
}

/// `TestName (1.23s)` → the name and the seconds.
fn name_and_seconds(rest: &str) -> Option<(String, f64)> {
    let (name, time) = rest.trim_end().rsplit_once(" (")?;
    let seconds = time.strip_suffix("s)")?.parse().ok()?;
    Some((name.to_string(), seconds))
}

/// `something_test.go:123: text`: what a test logs through `testing.T`.
fn is_test_log_line(line: &str) -> bool {
    let Some((file, rest)) = line.split_once(".go:") else { return false };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    !file.contains(' ') && digits > 0 && rest[digits..].starts_with(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
2026/01/01 10:00:00 Running tests with external agent /x/proxy-agent
=== RUN   TestBasicProxy_GRPC
I0101 10:00:00.100000    1 server.go:1] agent connected
2026-01-01T10:00:00.2Z  INFO konnectivity_agent: connected to the proxy server
--- PASS: TestBasicProxy_GRPC (0.52s)
=== RUN   TestAgent_MultipleConn
=== RUN   TestAgent_MultipleConn/http
=== NAME  TestAgent_MultipleConn/http
    concurrent_test.go:170: got 2 backends; expected 1
--- FAIL: TestAgent_MultipleConn (2.00s)
    --- FAIL: TestAgent_MultipleConn/http (1.99s)
=== RUN   TestProxyHandle_AfterDrain
    proxy_test.go:815: Get \"http://127.0.0.1:4000\": No agent available
--- FAIL: TestProxyHandle_AfterDrain (0.31s)
=== RUN   TestSkipped
    readiness_test.go:30: not on this platform
--- SKIP: TestSkipped (0.00s)
=== RUN   TestHangs
FAIL
";

    #[test]
    fn results_times_and_log_lines_are_read_from_mixed_output() {
        let run = parse(OUTPUT);
        let names: Vec<_> = run.outcomes.iter().map(|o| (o.name.as_str(), o.verdict)).collect();
        assert_eq!(
            names,
            [
                ("TestBasicProxy_GRPC", Verdict::Pass),
                ("TestAgent_MultipleConn", Verdict::Fail),
                ("TestAgent_MultipleConn/http", Verdict::Fail),
                ("TestProxyHandle_AfterDrain", Verdict::Fail),
                ("TestSkipped", Verdict::Skip),
            ]
        );
        assert_eq!(run.outcome("TestBasicProxy_GRPC").map(|o| o.seconds), Some(0.52));
        assert!(run.outcome("TestBasicProxy_GRPC").is_some_and(|o| o.log.is_empty()), "server and agent lines");
        assert_eq!(
            run.outcome("TestAgent_MultipleConn/http").map(|o| o.log.clone()),
            Some(vec!["concurrent_test.go:170: got 2 backends; expected 1".to_string()])
        );
        assert_eq!(
            run.outcome("TestProxyHandle_AfterDrain").map(|o| o.log.clone()),
            Some(vec!["proxy_test.go:815: Get \"http://127.0.0.1:4000\": No agent available".to_string()])
        );
        assert_eq!(run.unfinished, ["TestHangs"]);
        assert_eq!(run.summary, Some(false));
    }

    #[test]
    fn a_binary_that_died_has_no_summary() {
        let run = parse("=== RUN   TestA\npanic: test timed out after 5m0s\n\trunning tests:\n\t\tTestA (5m0s)\n");
        assert_eq!(run.summary, None);
        assert!(run.outcomes.is_empty());
        assert_eq!(run.unfinished, ["TestA"]);
    }
}
