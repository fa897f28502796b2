//! `--log-format=klog` and the start-up flag lines, on the real binaries: every stderr line of proxy-server,
//! proxy-agent and proxy-test-client parses as a klog line with the process's own pid, and each binary prints
//! every flag's effective value once (`FLAG: --name="value"`) before it starts its work.

use crate::faults::binary;
use konnectivity_it::stack::{Frontend, Stack, assert_settled, server_and_agent};
use konnectivity_it::targets::http_target;
use konnectivity_testkit::free_port;
use regex::Regex;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// A klog text line: severity, mmdd, time with microseconds, pid, file:line, then either a quoted message and
/// `key=value` pairs (values quoted, or bare words), or a bare message (klog's printf form) that does not start
/// with a quote.
fn klog_line() -> Regex {
    Regex::new(
        r#"^([IWE])(\d{4}) (\d{2}:\d{2}:\d{2}\.\d{6}) +(\d+) ([^ :\]]+\.rs|\?\?\?):(\d+)\] (?:"((?:[^"\\]|\\.)*)"((?: [A-Za-z_][A-Za-z0-9_.]*=(?:"(?:[^"\\]|\\.)*"|[^ "]+))*)|([^"].*))$"#,
    )
    .expect("regex")
}

/// Undoes the quoting of a message (enough for the flag lines: `\"`, `\\`, `\n`, `\t`).
fn unquote(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Checks that every line is a klog line from `pid`, and returns the messages in order.
fn klog_messages(lines: &[String], pid: u32) -> Vec<String> {
    let re = klog_line();
    assert!(!lines.is_empty(), "no log lines");
    lines
        .iter()
        .map(|line| {
            let caps = re.captures(line).unwrap_or_else(|| panic!("not a klog line: {line:?}"));
            assert_eq!(caps[4].parse::<u32>().ok(), Some(pid), "pid in {line:?}");
            match caps.get(9) {
                Some(bare) => bare.as_str().to_string(),
                None => unquote(&caps[7]),
            }
        })
        .collect()
}

/// The `FLAG: --name="value"` messages as a map; each flag appears once, and all come before `first_work`.
fn flag_lines(messages: &[String], first_work: &str) -> BTreeMap<String, String> {
    let work_at = messages.iter().position(|m| m.contains(first_work)).unwrap_or_else(|| panic!("{first_work:?}"));
    let mut flags = BTreeMap::new();
    for (i, m) in messages.iter().enumerate() {
        let Some(rest) = m.strip_prefix("FLAG: --") else { continue };
        assert!(i < work_at, "flag line after the work started: {m}");
        let (name, value) = rest.split_once('=').unwrap_or_else(|| panic!("{m}"));
        let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or_else(|| panic!("{m}"));
        assert!(flags.insert(name.to_string(), value.to_string()).is_none(), "{name} printed twice");
    }
    flags
}

/// Runs a long-lived binary until a line containing `marker` shows on stderr (30 s at most), then kills it and
/// returns its pid and stderr lines.
async fn run_until(name: &str, args: &[String], marker: &str) -> (u32, Vec<String>) {
    let mut child = tokio::process::Command::new(binary(name))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let pid = child.id().expect("pid");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut lines = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = stderr.next_line().await {
            let done = line.contains(marker);
            lines.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(found, Ok(true)), "{name} never logged {marker:?}:\n{}", lines.join("\n"));
    child.kill().await.expect("kill");
    (pid, lines)
}

#[tokio::test]
async fn server_and_agent_binaries_write_klog_lines_and_their_flags() {
    let stack = Stack::new().expect("pki");
    let agent_port = free_port();
    let server_args = vec![
        format!("--uds-name={}", stack.uds.display()),
        "--server-port=0".into(),
        format!("--cluster-cert={}", stack.pki.server_cert.display()),
        format!("--cluster-key={}", stack.pki.server_key.display()),
        format!("--cluster-ca-cert={}", stack.pki.ca.display()),
        "--agent-port".into(),
        agent_port.to_string(),
        "--health-port=0".into(),
        "--admin-port=0".into(),
        "--server-id=klog-server".into(),
        "--log-format=klog".into(),
    ];
    let server = tokio::spawn(async move { run_until("proxy-server", &server_args, "starting proxy-server").await });
    let mut agent_args = stack.agent_process_flags(agent_port);
    agent_args.extend([
        "--agent-id=klog-agent".into(),
        "--health-server-port=0".into(),
        "--admin-server-port=0".into(),
        "--log_format=klog".into(),
    ]);
    let (agent_pid, agent_lines) = run_until("proxy-agent", &agent_args, "starting proxy-agent").await;
    let (server_pid, server_lines) = server.await.expect("server task");

    let messages = klog_messages(&server_lines, server_pid);
    let flags = flag_lines(&messages, "starting proxy-server");
    assert_eq!(flags.get("log-format").map(String::as_str), Some("klog"));
    assert_eq!(flags.get("server-id").map(String::as_str), Some("klog-server"));
    assert_eq!(flags.get("agent-port"), Some(&agent_port.to_string()));
    assert_eq!(flags.get("v").map(String::as_str), Some("4"), "a default is printed too");
    assert_eq!(flags.get("logtostderr").map(String::as_str), Some("true"), "hidden klog flags too");
    assert_eq!(flags.get("cluster-key").map(String::as_str), Some(stack.pki.server_key.to_str().expect("utf-8")));
    assert!(!flags.contains_key("help"));
    assert!(flags.len() > 40, "only {} flags: {flags:?}", flags.len());

    let messages = klog_messages(&agent_lines, agent_pid);
    let flags = flag_lines(&messages, "starting proxy-agent");
    assert_eq!(flags.get("log-format").map(String::as_str), Some("klog"));
    assert_eq!(flags.get("agent-id").map(String::as_str), Some("klog-agent"));
    assert_eq!(flags.get("proxy-server-port"), Some(&agent_port.to_string()));
    // A path to a secret is printed (it is not the secret).
    assert_eq!(flags.get("service-account-token-path").map(String::as_str), Some(""));
    let start = agent_lines.iter().find(|l| l.contains("starting proxy-agent")).expect("start line");
    assert!(start.contains(r#" agent_id="klog-agent""#), "{start}");
}

#[tokio::test]
async fn the_test_client_writes_klog_lines_and_its_flags() {
    let target = http_target("127.0.0.1:0").await.expect("target");
    let stack = Stack::new().expect("pki");
    let (server, agent) = server_and_agent(&stack, Frontend::Uds).await.expect("stack");
    let konnectivity_server::FrontendAddr::Uds(uds) = &server.frontend_addr else { panic!("uds frontend") };
    let child = tokio::process::Command::new(binary("proxy-test-client"))
        .args([
            format!("--proxy-uds={}", uds.display()),
            "--request-host=127.0.0.1".into(),
            format!("--request-port={}", target.addr.port()),
            "--log-format=klog".into(),
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id().expect("pid");
    let out = child.wait_with_output().await.expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "success");
    let lines: Vec<String> = stderr.lines().map(String::from).collect();
    let mut messages = klog_messages(&lines, pid);
    messages.push("the end".into()); // the client logs nothing else when all goes well
    let flags = flag_lines(&messages, "the end");
    assert_eq!(flags.get("proxy-uds").map(String::as_str), uds.to_str());
    assert_eq!(flags.get("mode").map(String::as_str), Some("grpc"));
    assert_eq!(flags.get("log-format").map(String::as_str), Some("klog"));
    assert_settled(&server, Some(&agent)).await;
    agent.stop().await;
    server.stop().await;
}

#[test]
fn the_klog_regex_takes_klog_lines_and_nothing_else() {
    let re = klog_line();
    for good in [
        r#"I1202 08:00:00.000000   12345 server.rs:42] "message" key="value" other=3"#,
        r#"E0101 23:59:59.999999 1234567 ???:1] "with \"quotes\" and \\n" err="x\ty""#,
        r#"W1231 00:00:00.000001       1 a.rs:7] """#,
        r#"I1202 08:00:00.000000   12345 flags.rs:1] FLAG: --v="4""#,
    ] {
        assert!(re.is_match(good), "{good}");
    }
    for bad in [
        "2026-12-02T08:00:00Z INFO message",
        r#"I1202 08:00:00.000000   12345 server.rs:42] "m" junk"#,
        r#"I1202 08:00:00 12345 server.rs:42] "m""#,
        r#"D1202 08:00:00.000000   12345 server.rs:42] "m""#,
        r#"I1202 08:00:00.000000   12345 server.rs:42] "m" key="unterminated"#,
    ] {
        assert!(!re.is_match(bad), "{bad}");
    }
}
