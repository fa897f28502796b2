//! The reference's own integration suite, `sigs.k8s.io/apiserver-network-proxy/tests` (v0.36.0, pinned in
//! `interop/go.mod`), run against our `proxy-agent`. The suite starts the reference proxy-server in-process and
//! our agent as a child process (`-agent-path`), passing it every flag of the reference agent, and checks what
//! a user of the reference would see: tunnels, dial errors, metrics, readiness, drain, reconnects.
//!
//! `interop/build.sh` compiles the suite (`go test -c`) into `interop/bin/anp-tests`. It runs from the
//! package's directory in the module cache, as `go test` would, inside a network namespace of its own
//! ([`network`]): two of its tests dial 198.18.0.254 expecting the dial to hang and one resolves a name that
//! must not exist, so on a host network they would depend on (and send packets to) whatever that network
//! holds. [`nxdomain`] is the namespace's resolver.
//!
//! Every test of the suite must pass, except those in [`EXPECTED_FAILURES`], which must fail, and those in
//! [`FLAKY`], which must pass at least once in a few runs.

mod go_test_output;
mod network;
mod nxdomain;
mod suite;

use go_test_output::{Outcome, Verdict};
use konnectivity_it::controlplane::workspace_bin;
use konnectivity_testkit::TempDir;
use network::{RESOLVER, SuiteNetwork};
use nxdomain::NxDomainDns;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use suite::{Rerun, Suite, end_what_is_left, keep_log};

/// A reference test known not to pass every time, why, and how its failure looks.
struct Known {
    test: &'static str,
    why: &'static str,
    /// A failure is this known one only if one of these is in what the test logged; any other failure counts.
    fails_with: &'static [&'static str],
}

impl Known {
    /// The entry of `list` for `name` (a subtest shares its test's entry).
    fn find<'a>(list: &'a [Known], name: &str) -> Option<&'a Known> {
        list.iter().find(|k| name.split('/').next() == Some(k.test))
    }

    /// Whether a failure that logged `log` is this one.
    fn explains(&self, log: &[String]) -> bool {
        log.iter().any(|line| self.fails_with.iter().any(|f| line.contains(f)))
    }
}

/// Reference tests that fail against our agent. When the agent is fixed, remove the entry: the run fails if a
/// test listed here passes [`RECHECKS`] + 1 times in a row, or is no longer in the suite. None at present
/// (`TestProxyHandle_AfterDrain` was here until the draining agent stayed for `--drain-idle-period`).
const EXPECTED_FAILURES: &[Known] = &[];

/// How many more times an expected failure that passed is run, until it fails: a test that fails half the
/// time (a race) still passes all of these with a chance of about 1 in 2000.
const RECHECKS: u32 = 10;

/// Reference tests that fail now and then with the reference's own (in-process) agent too: a failure is run
/// again [`RETRIES`] times and must pass at least once. Measure again when the suite's version changes.
const FLAKY: &[Known] = &[Known {
    test: "TestProxyHandle_TunnelContextCancelled_GRPC",
    why: "cancelling the tunnel's context races two reactions of the Go client: its HTTP transport returning \
          \"context canceled\" (what the test wants) and the tunnel closing its connection, which the \
          transport, still reading, may report first as EOF; 5 of 60 runs failed so with the reference's \
          in-process agent, 7 of 60 with ours",
    fails_with: &["\": EOF"],
}];

/// How many times a flaky test that failed is run again.
const RETRIES: u32 = 8;

/// The test that resolves a name that must not exist, and that name: our resolver must have been asked.
const DNS_TEST: (&str, &str) = ("TestFailedDNSLookupProxy_HTTPCONN", "thisdefinitelydoesnotexist.com.");
/// A test that dials the blackhole: it must have swallowed something.
const BLACKHOLE_TEST: &str = "TestProxyDial_AgentTimeout_GRPC";

/// The suite's servers listen on `$TMPDIR/anp-testing<up to 10 digits>/server-<uuid>.sock`: this many bytes
/// after TMPDIR, of the 107 a Unix socket's path may have.
const SOCKET_NAME_LEN: usize = 71;

static NEXT: AtomicU64 = AtomicU64::new(0);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_suite_passes_against_our_agent() {
    // The reference suite runs in a network namespace of its own: fails here, saying why, where none can be made.
    konnectivity_it::netns::require();
    let dir = TempDir::new("anp").expect("temp dir");
    assert!(
        dir.path().as_os_str().len() <= 107 - SOCKET_NAME_LEN,
        "{}: too long a path for the suite's Unix sockets (set a shorter TMPDIR)",
        dir.path().display()
    );
    let agent = workspace_bin("proxy-agent").unwrap_or_else(|e| panic!("{e:#}"));
    let suite = Suite::locate(agent, dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let id = format!("{}{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed));
    let network = SuiteNetwork::create(&format!("krs-anp{id}")).unwrap_or_else(|e| panic!("{e:#}"));
    network.check_closed().unwrap_or_else(|e| panic!("{e:#}"));
    let dns = NxDomainDns::start(network.ns(), RESOLVER).unwrap_or_else(|e| panic!("{e:#}"));

    let listed = suite.list(&network).await.unwrap_or_else(|e| panic!("{e:#}"));
    let started = Instant::now();
    let (status, log) =
        suite.run(&network, &["-test.count=1".into()], "suite").await.unwrap_or_else(|e| panic!("{e:#}"));
    let took = started.elapsed();
    let mut leftovers = end_what_is_left(&network).await;
    let output = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("reading {}: {e}", log.display()));
    let run = go_test_output::parse(&output);

    let mut reruns = Vec::new();
    for o in run.outcomes.iter().filter(|o| !o.name.contains('/')) {
        let rerun = match o.verdict {
            Verdict::Pass if Known::find(EXPECTED_FAILURES, &o.name).is_some() => (RECHECKS, true),
            Verdict::Fail if Known::find(FLAKY, &o.name).is_some_and(|k| k.explains(&o.log)) => (RETRIES, false),
            _ => continue,
        };
        reruns.push(suite.rerun(&network, &o.name, rerun.0, rerun.1).await.unwrap_or_else(|e| panic!("{e:#}")));
        leftovers.extend(end_what_is_left(&network).await);
    }
    let took_all = started.elapsed();

    let mut problems = Vec::new();
    match status.code() {
        Some(0 | 1) => {}
        _ => problems.push(format!("the suite exited {status} (a panic, its timeout, or killed from here)")),
    }
    if run.summary.is_none() {
        problems.push("the suite printed no PASS/FAIL summary: it did not run to the end".into());
    }
    if !leftovers.is_empty() {
        problems.push(format!("processes outlived the suite in its namespace (killed): {leftovers:?}"));
    }
    problems.extend(judge(&listed, &run.outcomes, &run.unfinished, &reruns));
    problems.extend(check_sandbox_was_used(&listed, &network, &dns));

    let mut report = report(&suite, listed.len(), &run, &reruns, &dns, &network);
    let _ =
        writeln!(report, "time: {:.1} s the suite, {:.1} s with reruns", took.as_secs_f64(), took_all.as_secs_f64());
    eprintln!("{report}");
    if !problems.is_empty() {
        let kept = keep_log(&log);
        let tail: Vec<_> = output.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        panic!(
            "the reference suite against our agent:\n- {}\n\n{report}\nlast lines of its output:\n{}\n\nwhole output: {kept}",
            problems.join("\n- "),
            tail.join("\n")
        );
    }
}

/// What is wrong with a run: tests that failed, were skipped or never ended, except as [`EXPECTED_FAILURES`]
/// and [`FLAKY`] (with their reruns) allow; listed tests that passed every recheck or no longer exist.
fn judge(listed: &[String], outcomes: &[Outcome], unfinished: &[String], reruns: &[Rerun]) -> Vec<String> {
    judge_against(EXPECTED_FAILURES, FLAKY, listed, outcomes, unfinished, reruns)
}

/// [`judge`] with these lists of expected failures and flaky tests.
fn judge_against(
    expected_failures: &[Known],
    flaky_tests: &[Known],
    listed: &[String],
    outcomes: &[Outcome],
    unfinished: &[String],
    reruns: &[Rerun],
) -> Vec<String> {
    let rerun = |name: &str| reruns.iter().find(|r| r.name == name);
    let logged = |log: &[String]| log.join("\n    ");
    let mut problems = Vec::new();
    for name in listed {
        if !outcomes.iter().any(|o| o.name == *name) {
            let why = if unfinished.contains(name) { "started and never ended" } else { "never ran" };
            problems.push(format!("{name} {why}"));
        }
    }
    for o in outcomes {
        let (expected, flaky) = (Known::find(expected_failures, &o.name), Known::find(flaky_tests, &o.name));
        match o.verdict {
            Verdict::Fail if expected.is_some_and(|k| k.explains(&o.log)) => {}
            Verdict::Fail if o.name.contains('/') && (expected.is_some() || flaky.is_some()) => {}
            Verdict::Fail if flaky.is_some_and(|k| k.explains(&o.log)) => match rerun(&o.name) {
                Some(r) if r.first(Verdict::Pass).is_some() => {}
                Some(r) => problems.push(format!(
                    "{} failed, and again in all {} reruns (it is listed as FLAKY, not as broken):\n    {}",
                    o.name,
                    r.verdicts.len(),
                    logged(&r.log)
                )),
                None => problems.push(format!("{} failed and was not run again", o.name)),
            },
            Verdict::Fail if expected.is_some() || flaky.is_some() => problems.push(format!(
                "{} failed, but not in the known way (the log has none of {:?}):\n    {}",
                o.name,
                expected.or(flaky).map(|k| k.fails_with).unwrap_or_default(),
                logged(&o.log)
            )),
            Verdict::Fail => problems.push(format!("{} failed:\n    {}", o.name, logged(&o.log))),
            Verdict::Pass if expected.is_some() && !o.name.contains('/') => match rerun(&o.name) {
                Some(r) if r.first(Verdict::Fail).is_some() => {}
                Some(r) => problems.push(format!(
                    "{} passed {} times in a row, but EXPECTED_FAILURES says it fails: the agent is fixed, \
                     remove the entry",
                    o.name,
                    r.verdicts.len() + 1
                )),
                None => problems.push(format!("{} passed and was not checked again", o.name)),
            },
            Verdict::Pass => {}
            Verdict::Skip => problems.push(format!("{} was skipped: {}", o.name, o.log.join(" / "))),
        }
    }
    for known in expected_failures.iter().chain(flaky_tests) {
        if !listed.iter().any(|l| l == known.test) {
            problems.push(format!("{} is listed here but no longer in the suite: remove the entry", known.test));
        }
    }
    problems
}

/// Problems if the namespace's resolver and blackhole were not what the tests that need them used.
fn check_sandbox_was_used(listed: &[String], network: &SuiteNetwork, dns: &NxDomainDns) -> Vec<String> {
    let mut problems = Vec::new();
    let (dns_test, name) = DNS_TEST;
    if listed.iter().any(|l| l == dns_test) && !dns.queries().iter().any(|q| q.starts_with(name)) {
        problems.push(format!("{dns_test} ran, but the namespace's resolver was never asked for {name}"));
    }
    if listed.iter().any(|l| l == BLACKHOLE_TEST) {
        match network.blackholed_frames() {
            Ok(0) => problems.push(format!("{BLACKHOLE_TEST} ran, but nothing went into the blackhole")),
            Ok(_) => {}
            Err(e) => problems.push(format!("counting the blackhole's frames: {e:#}")),
        }
    }
    problems
}

/// The pass/fail list with times, the reruns, and what the namespace's resolver and blackhole saw.
fn report(
    suite: &Suite,
    listed: usize,
    run: &go_test_output::Run,
    reruns: &[Rerun],
    dns: &NxDomainDns,
    network: &SuiteNetwork,
) -> String {
    let count = |v| run.outcomes.iter().filter(|o| o.verdict == v && !o.name.contains('/')).count();
    let mut out = format!(
        "reference suite {} against {}: {listed} tests, {} passed, {} failed, {} skipped\n",
        suite.dir.display(),
        suite.agent.display(),
        count(Verdict::Pass),
        count(Verdict::Fail),
        count(Verdict::Skip),
    );
    for o in &run.outcomes {
        let verdict = match o.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        let _ = write!(out, "  {verdict} {:>7.2}s  {}", o.seconds, o.name);
        for (list, what) in [(EXPECTED_FAILURES, "expected to fail"), (FLAKY, "flaky")] {
            if let Some(known) = list.iter().find(|k| k.test == o.name) {
                let _ = write!(out, "  ({what}: {})", known.why);
            }
        }
        out.push('\n');
        if o.verdict != Verdict::Pass {
            for line in &o.log {
                let _ = writeln!(out, "        {line}");
            }
        }
    }
    for name in &run.unfinished {
        let _ = writeln!(out, "  ----          {name} (never ended)");
    }
    for r in reruns {
        let passes = r.verdicts.iter().filter(|v| **v == Verdict::Pass).count();
        let _ = writeln!(out, "{} ran again: {passes} of {} runs passed", r.name, r.verdicts.len());
        for line in &r.log {
            let _ = writeln!(out, "        {line}");
        }
    }
    let queries = dns.queries();
    let _ = writeln!(out, "resolver {RESOLVER}: {} queries, all NXDOMAIN: {}", queries.len(), queries.join(", "));
    if let Ok(frames) = network.blackholed_frames() {
        let _ = writeln!(out, "blackhole {}: {frames} frames dropped", network::BLACKHOLE);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run by hand on the host network, the suite's binary does nothing: it would dial 198.18.0.254 and resolve a
    /// name that must not exist there. (`-test.list` only lists, so even a broken guard sends nothing.)
    #[test]
    fn the_suite_refuses_to_start_on_the_host_network() {
        let guard = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/bin/anp-tests");
        let out = std::process::Command::new(&guard)
            .arg("-test.list=.")
            .output()
            .unwrap_or_else(|e| panic!("{}: {e} (interop/build.sh builds it)", guard.display()));
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(out.stdout.is_empty(), "listed tests: {}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to run"), "{out:?}");
    }

    fn outcome(name: &str, verdict: Verdict, log: &str) -> Outcome {
        Outcome { name: name.into(), verdict, seconds: 0.1, log: vec![format!("x_test.go:1: {log}")] }
    }

    fn rerun(name: &str, verdicts: &[Verdict]) -> Rerun {
        Rerun { name: name.into(), verdicts: verdicts.to_vec(), log: Vec::new() }
    }

    /// Lists of the judge's own, since the real ones may be empty.
    const TEST_EXPECTED: &[Known] = &[Known { test: "TestBroken", why: "a bug", fails_with: &["known bug"] }];
    const TEST_FLAKY: &[Known] = &[Known { test: "TestWobbly", why: "a race", fails_with: &["race lost"] }];

    fn judge(listed: &[String], outcomes: &[Outcome], unfinished: &[String], reruns: &[Rerun]) -> Vec<String> {
        judge_against(TEST_EXPECTED, TEST_FLAKY, listed, outcomes, unfinished, reruns)
    }

    #[test]
    fn only_the_listed_failures_are_forgiven_and_the_lists_cannot_rot() {
        use Verdict::{Fail, Pass, Skip};
        let (expected, flaky) = (&TEST_EXPECTED[0], &TEST_FLAKY[0]);
        let (e, f) = (expected.test, flaky.test);
        let listed = vec!["TestA".to_string(), "TestB".into(), e.into(), f.into()];
        let (known_e, known_f) = (expected.fails_with[0], flaky.fails_with[0]);
        let with = |a, b, ev, fv| {
            [outcome("TestA", a, ""), outcome("TestB", b, ""), outcome(e, ev, known_e), outcome(f, fv, known_f)]
        };
        assert!(judge(&listed, &with(Pass, Pass, Fail, Pass), &[], &[]).is_empty());

        let mut otherwise = with(Pass, Pass, Fail, Pass);
        otherwise[2].log = vec!["x_test.go:1: something new".into()];
        let problems = judge(&listed, &otherwise, &[], &[]);
        assert!(problems.len() == 1 && problems[0].contains("not in the known way"), "{problems:?}");

        let lucky = with(Pass, Pass, Pass, Pass);
        assert!(judge(&listed, &lucky, &[], &[rerun(e, &[Pass, Pass, Fail])]).is_empty(), "fails on a rerun");
        let problems = judge(&listed, &lucky, &[], &[rerun(e, &[Pass; 10])]);
        assert!(problems.len() == 1 && problems[0].contains("remove the entry"), "{problems:?}");
        assert_eq!(judge(&listed, &lucky, &[], &[]).len(), 1, "a pass must be rechecked");

        let wobbly = with(Pass, Pass, Fail, Fail);
        assert!(judge(&listed, &wobbly, &[], &[rerun(f, &[Fail, Pass, Pass])]).is_empty(), "passes on a retry");
        let problems = judge(&listed, &wobbly, &[], &[rerun(f, &[Fail; 3])]);
        assert!(problems.len() == 1 && problems[0].contains("all 3 reruns"), "{problems:?}");

        assert_eq!(judge(&listed, &with(Fail, Skip, Fail, Pass), &[], &[]).len(), 2, "a failure and a skip");

        let died = [outcome("TestA", Pass, "")];
        let problems = judge(&listed[..2], &died, &["TestB".to_string()], &[]);
        assert!(problems.len() == 3, "{problems:?}");
        assert!(problems[0].contains("never ended"), "{problems:?}");
        assert!(problems[1..].iter().all(|p| p.contains("no longer in the suite")), "{problems:?}");

        let problems = judge(&listed, &with(Pass, Pass, Fail, Pass)[..3], &[], &[]);
        assert!(problems.len() == 1 && problems[0].contains("never ran"), "{problems:?}");
    }
}
