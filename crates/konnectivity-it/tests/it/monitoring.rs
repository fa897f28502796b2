//! The monitoring bundle (`deploy/monitoring`) against the real binaries: every metric, label and label value that
//! the dashboard and the alerts query must be served on the health port of a proxy-server or a proxy-agent. A
//! scenario gives the labelled families their series first (they appear only once they have one): tunneled traffic,
//! refused, unanswered, abandoned and agentless dials, a broken TLS handshake, TLS files that change (usable, then
//! not, then usable again), streams that break, an audit log, and an agent whose token cannot be reviewed.

use hyper_util::rt::TokioIo;
use konnectivity_it::eventually;
use konnectivity_it::fake_agent::FakeAgent;
use konnectivity_it::stack::{AgentRun, Frontend, ServerRun, Stack, assert_settled};
use konnectivity_it::targets::{closed_port, http_target};
use konnectivity_proto::proxy::ProxyServiceClient;
use konnectivity_proto::{Packet, PacketKind};
use konnectivity_server::config::AgentAuthConfig;
use konnectivity_server::metrics::DialFailureReason;
use konnectivity_server::{AuditConfig, AuditOutput, FrontendListen};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DASHBOARD: &str = include_str!("../../../../deploy/monitoring/dashboards/konnectivity.json");
const RULES: &str = include_str!("../../../../deploy/monitoring/prometheusrule.yaml");
const POD_MONITORS: &str = include_str!("../../../../deploy/monitoring/podmonitors.yaml");

/// Labels the scrape adds to every series (Prometheus, the Prometheus Operator), not the binaries.
const TARGET_LABELS: &[&str] = &["job", "instance", "namespace", "pod", "container", "endpoint"];
/// Series Prometheus itself makes for each target.
const SCRAPE_SERIES: &[&str] = &["up"];
/// PromQL aggregation operators: followed by `by (...)`, `without (...)` or `(`, never a metric name.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Words that are neither metric names nor functions.
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2", "Inf", "NaN", "inf", "nan"];
/// Modifiers followed by a list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// A label matcher of a selector, with the values it names literally (none for a regular expression beyond a
/// plain `a|b` list, or a dashboard variable: those cannot be checked).
#[derive(Debug, PartialEq)]
struct Matcher {
    label: String,
    values: Vec<String>,
}

/// What a PromQL expression refers to.
#[derive(Debug, Default, PartialEq)]
struct Query {
    /// Metric names, each with its matchers.
    selectors: Vec<(String, Vec<Matcher>)>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left` and `group_right` lists.
    grouping: Vec<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The index after the string literal starting at `chars[start]` (a quote), and its unescaped text.
fn string_at(chars: &[char], start: usize) -> Result<(usize, String), String> {
    let quote = chars[start];
    let mut text = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => {
                text.extend(chars.get(i + 1));
                i += 2;
            }
            c if c == quote => return Ok((i + 1, text)),
            c => {
                text.push(c);
                i += 1;
            }
        }
    }
    Err(format!("unterminated string at {start}"))
}

fn skip_spaces(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The literal values a matcher names: the value of `=` and `!=`, the alternatives of a `=~` or `!~` that is a
/// plain `a|b|c` list; nothing for other regular expressions or values with a dashboard variable.
fn literal_values(op: &str, value: &str) -> Vec<String> {
    if value.contains('$') {
        return Vec::new();
    }
    match op {
        "=" | "!=" => vec![value.to_string()],
        _ if value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '|') => {
            value.split('|').map(str::to_string).collect()
        }
        _ => Vec::new(),
    }
}

/// Parses the matchers of a selector whose `{` is at `chars[open]`; returns the index after its `}`.
fn matchers_at(chars: &[char], open: usize) -> Result<(usize, Vec<Matcher>), String> {
    let mut out = Vec::new();
    let mut i = open + 1;
    loop {
        i = skip_spaces(chars, i);
        match chars.get(i) {
            None => return Err("unterminated selector".into()),
            Some('}') => return Ok((i + 1, out)),
            Some(',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        if label.is_empty() {
            return Err(format!("a label name expected at {start}"));
        }
        i = skip_spaces(chars, i);
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| chars[i..].iter().take(op.len()).copied().eq(op.chars()))
            .ok_or_else(|| format!("a matcher operator expected after {label}"))?;
        i = skip_spaces(chars, i + op.len());
        if !matches!(chars.get(i), Some('"' | '\'' | '`')) {
            return Err(format!("a quoted value expected for {label}"));
        }
        let (after, value) = string_at(chars, i)?;
        i = after;
        out.push(Matcher { values: literal_values(op, &value), label });
    }
}

/// Finds the metric names, matchers and grouping labels of a PromQL expression. It knows PromQL's lexical
/// structure (strings, ranges, numbers and durations, comments, Grafana's `$variables`), its aggregations and
/// keywords; any other identifier followed by `(` is a function, and the rest are metric names.
fn parse_promql(expr: &str) -> Result<Query, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut q = Query::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            i = string_at(&chars, i)?.0;
        } else if c == '[' {
            i += chars[i..].iter().position(|&c| c == ']').ok_or("unterminated range")? + 1;
        } else if c == '{' {
            return Err("a selector without a metric name (e.g. {__name__=...}) cannot be checked".into());
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i += chars[i..].iter().position(|&c| c == '}').ok_or("unterminated ${variable}")? + 1;
            } else {
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration: 0.5, 1e-3, 0x1f, 5m, 1h30m.
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || (matches!(chars[i], '+' | '-') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_spaces(&chars, i);
            if LABEL_LISTS.contains(&word.as_str()) {
                if chars.get(next) == Some(&'(') {
                    let close = next + chars[next..].iter().position(|&c| c == ')').ok_or("unterminated label list")?;
                    let list: String = chars[next + 1..close].iter().collect();
                    q.grouping.extend(list.split(',').map(str::trim).filter(|l| !l.is_empty()).map(str::to_string));
                    i = close + 1;
                }
            } else if AGGREGATIONS.contains(&word.as_str())
                || KEYWORDS.contains(&word.as_str())
                || chars.get(next) == Some(&'(')
            {
                // An aggregation, a keyword or a function.
            } else if chars.get(next) == Some(&'{') {
                let (after, matchers) = matchers_at(&chars, next)?;
                q.selectors.push((word, matchers));
                i = after;
            } else {
                q.selectors.push((word, Vec::new()));
            }
        } else {
            i += 1;
        }
    }
    Ok(q)
}

/// A Grafana query variable, `label_values(<selector>, <label>)`, as a query over that selector that groups by
/// the label (so the label must exist on it).
fn parse_variable_query(query: &str) -> Result<Query, String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .ok_or_else(|| format!("only label_values(<selector>, <label>) variables are checked: {query}"))?;
    let (selector, label) = inner.rsplit_once(',').ok_or_else(|| format!("no label in {query}"))?;
    let mut q = parse_promql(selector)?;
    q.grouping.push(label.trim().to_string());
    Ok(q)
}

/// The expressions of the dashboard: every query of every panel, and the query variables.
fn dashboard_queries(json: &str) -> Result<Vec<(String, Query)>, String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                if let Some(serde_json::Value::String(e)) = o.get("expr") {
                    out.push(e.clone());
                }
                o.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("dashboard JSON: {e}"))?;
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], &mut exprs);
    let mut out = Vec::new();
    for e in exprs {
        let q = parse_promql(&e).map_err(|m| format!("{e}: {m}"))?;
        out.push((e, q));
    }
    for v in dashboard["templating"]["list"].as_array().ok_or("dashboard has no templating list")? {
        if v["type"] != "query" {
            continue;
        }
        let query = v["query"]["query"].as_str().or(v["query"].as_str()).ok_or("a query variable without query")?;
        let q = parse_variable_query(query).map_err(|m| format!("variable {}: {m}", v["name"]))?;
        out.push((query.to_string(), q));
    }
    Ok(out)
}

/// One rule of the PrometheusRule: its key lines (`alert`, `record`, `for`, `severity`, ...) and its expression.
#[derive(Debug, Default)]
struct Rule {
    name: String,
    keys: BTreeSet<String>,
    expr: String,
}

/// The rules of prometheusrule.yaml, read line by line: each starts with `- alert:` or `- record:`, and its `expr:`
/// is a one-line value or a `|` block.
fn rules(yaml: &str) -> Result<Vec<Rule>, String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out: Vec<Rule> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start().trim_start_matches("- ");
        i += 1;
        if t.starts_with('#') {
            continue;
        }
        if let Some(name) = t.strip_prefix("alert:").or_else(|| t.strip_prefix("record:")) {
            out.push(Rule { name: name.trim().to_string(), ..Rule::default() });
        }
        let Some(rule) = out.last_mut() else { continue };
        if let Some((key, _)) = t.split_once(':') {
            rule.keys.insert(key.to_string());
        }
        if let Some(value) = t.strip_prefix("expr:").map(str::trim) {
            if value.starts_with('|') || value.starts_with('>') {
                let own = indent(line);
                while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > own) {
                    rule.expr.push_str(lines[i].trim());
                    rule.expr.push('\n');
                    i += 1;
                }
            } else {
                rule.expr = value.trim_matches('"').to_string();
            }
        }
    }
    if let Some(r) = out.iter().find(|r| r.expr.trim().is_empty()) {
        return Err(format!("rule {} has no expr", r.name));
    }
    Ok(out)
}

/// The job names the PodMonitors give their targets (`targetLabel: job` then `replacement: <name>`).
fn pod_monitor_jobs(yaml: &str) -> BTreeSet<String> {
    let lines: Vec<&str> = yaml.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter(|w| w[0] == "targetLabel: job")
        .filter_map(|w| w[1].strip_prefix("replacement:").map(|v| v.trim().to_string()))
        .collect()
}

/// A metric family as scraped: its type and, per label, the values seen.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// Families of a Prometheus text-format scrape by name (histogram and summary series under their base name).
fn parse_scrape(text: &str) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| format!("bad TYPE line: {line}"))?;
            families.entry(name.to_string()).or_default().kind = kind.to_string();
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let end = chars.iter().position(|&c| !is_ident(c)).unwrap_or(chars.len());
        let name: String = chars[..end].iter().collect();
        let matchers = if chars.get(end) == Some(&'{') { matchers_at(&chars, end)?.1 } else { Vec::new() };
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| families.get(*b).is_some_and(|f| f.kind == "histogram" || f.kind == "summary"))
            })
            .unwrap_or(&name)
            .to_string();
        let family = families.get_mut(&base).ok_or_else(|| format!("a sample before its TYPE: {line}"))?;
        for m in matchers.into_iter().filter(|m| m.label != "le" && m.label != "quantile") {
            family.labels.entry(m.label).or_default().extend(m.values);
        }
    }
    Ok(families)
}

/// What the bundle's expressions may refer to besides the scraped families.
struct Known<'a> {
    server: &'a BTreeMap<String, Family>,
    agent: &'a BTreeMap<String, Family>,
    /// Names recorded by the rules, each with the metrics its expression reads (a selector of a recorded series
    /// is checked as one of each of those).
    recorded: &'a BTreeMap<String, Vec<String>>,
    /// Job names the PodMonitors set.
    jobs: &'a BTreeSet<String>,
}

impl Known<'_> {
    /// The scraped family the series `name` belongs to, and whether `name` is one of its `_bucket` series. A
    /// suffix is only stripped from the name of a histogram (or a summary).
    fn family<'f>(families: &'f BTreeMap<String, Family>, name: &str) -> Option<(&'f Family, bool)> {
        if let Some(f) = families.get(name) {
            return Some((f, false));
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let f = families.get(name.strip_suffix(suffix)?)?;
            let ok = f.kind == "histogram" || (f.kind == "summary" && *suffix != "_bucket");
            ok.then_some((f, *suffix == "_bucket"))
        })
    }

    /// Everything in `q` that the binaries do not serve.
    fn problems(&self, q: &Query) -> Vec<String> {
        let mut out = Vec::new();
        let mut labels_in_query: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
        let mut selectors: Vec<(&String, &Vec<Matcher>)> = Vec::new();
        for (name, matchers) in &q.selectors {
            match self.recorded.get(name) {
                Some(sources) => selectors.extend(sources.iter().map(|s| (s, matchers))),
                None if name.contains(':') => out.push(format!("{name}: no rule records it")),
                None => selectors.push((name, matchers)),
            }
        }
        for (name, matchers) in selectors {
            let target_label = |m: &Matcher, out: &mut Vec<String>| {
                if m.label == "job" {
                    for v in m.values.iter().filter(|v| !self.jobs.contains(*v)) {
                        out.push(format!("{name}: job {v:?} is not a job the PodMonitors set ({:?})", self.jobs));
                    }
                }
                TARGET_LABELS.contains(&m.label.as_str())
            };
            if SCRAPE_SERIES.contains(&name.as_str()) {
                for m in matchers {
                    if !target_label(m, &mut out) {
                        out.push(format!("{name}: label {} is not a target label", m.label));
                    }
                }
                continue;
            }
            let components: &[(&str, &BTreeMap<String, Family>)] =
                if name.starts_with("konnectivity_network_proxy_server_") {
                    &[("server", self.server)]
                } else if name.starts_with("konnectivity_network_proxy_agent_") {
                    &[("agent", self.agent)]
                } else {
                    &[("server", self.server), ("agent", self.agent)]
                };
            for (component, families) in components {
                let Some((family, bucket)) = Self::family(families, name) else {
                    out.push(format!("{name} is not served by the {component}"));
                    continue;
                };
                labels_in_query.extend(family.labels.keys().map(String::as_str));
                if bucket {
                    labels_in_query.insert("le");
                }
                for m in matchers {
                    if target_label(m, &mut out) || (bucket && m.label == "le") {
                        continue;
                    }
                    let Some(seen) = family.labels.get(&m.label) else {
                        out.push(format!("{name}: the {component} serves no label {}", m.label));
                        continue;
                    };
                    for v in &m.values {
                        if !seen.contains(v) {
                            out.push(format!("{name}: the {component} served no {}={v:?} (seen: {seen:?})", m.label));
                        }
                    }
                }
            }
        }
        for l in q.grouping.iter().filter(|l| !labels_in_query.contains(l.as_str())) {
            out.push(format!("label {l} (by, without, on, ignoring, group_*) is on none of the metrics queried"));
        }
        out
    }
}

/// Every problem of the bundle's expressions, as "where: what".
fn bundle_problems(known: &Known<'_>, queries: &[(String, Query)]) -> Vec<String> {
    queries
        .iter()
        .flat_map(|(expr, q)| known.problems(q).into_iter().map(move |p| format!("{p}\n    in: {expr}")))
        .collect()
}

/// Whether `registry` exports the family `name` (it does once the family has a series).
fn exports(registry: &prometheus::Registry, name: &str) -> bool {
    registry.gather().iter().any(|f| f.name() == name)
}

/// Opens a raw `/ProxyService/Proxy` stream on the frontend socket `uds` and sends a DATA packet larger than the
/// server accepts (4 MiB); returns once the server has ended the stream.
async fn send_oversized_frontend_message(uds: &std::path::Path) {
    let path = uds.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect to the frontend socket");
    let mut client = ProxyServiceClient::new(channel).max_encoding_message_size(16 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Packet::data(1, bytes::Bytes::from(vec![0u8; 5 << 20]))).await.expect("queue");
    let ended = match client.proxy(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
        Err(status) => Some(status),
        Ok(response) => tokio::time::timeout(Duration::from_secs(10), response.into_inner().message())
            .await
            .expect("the server ends the stream")
            .err(),
    };
    assert!(ended.is_some(), "the oversized message was accepted");
}

async fn scrape(addr: SocketAddr) -> BTreeMap<String, Family> {
    let conn = tokio::net::TcpStream::connect(addr).await.expect("connect to the health port");
    let (status, body) = konnectivity_it::http::get(conn, &addr.to_string(), "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "/metrics on {addr}");
    parse_scrape(&String::from_utf8_lossy(&body)).expect("a valid scrape")
}

/// Merges the families of several scrapes of one binary (different configurations serve different families).
fn merge(scrapes: Vec<BTreeMap<String, Family>>) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for (name, f) in scrapes.into_iter().flatten() {
        let into = out.entry(name).or_default();
        into.kind = f.kind;
        for (label, values) in f.labels {
            into.labels.entry(label).or_default().extend(values);
        }
    }
    out
}

/// The bundle's files, parsed.
struct Bundle {
    /// Every expression of the dashboard and the rules, with what it refers to.
    queries: Vec<(String, Query)>,
    /// The names the rules record, each with the metrics its expression reads.
    recorded: BTreeMap<String, Vec<String>>,
    /// The job names the PodMonitors set.
    jobs: BTreeSet<String>,
}

fn bundle() -> Bundle {
    let rules = rules(RULES).expect("prometheusrule.yaml");
    let mut queries = dashboard_queries(DASHBOARD).expect("dashboard");
    let dashboard_count = queries.len();
    for r in &rules {
        queries.push((r.expr.clone(), parse_promql(&r.expr).unwrap_or_else(|e| panic!("rule {}: {e}", r.name))));
    }
    assert!(dashboard_count > 30 && rules.len() > 10, "{dashboard_count} dashboard queries, {} rules", rules.len());
    let recorded = rules
        .iter()
        .filter(|r| r.keys.contains("record"))
        .map(|r| {
            let q = parse_promql(&r.expr).unwrap_or_else(|e| panic!("rule {}: {e}", r.name));
            (r.name.clone(), q.selectors.into_iter().map(|(n, _)| n).collect())
        })
        .collect();
    Bundle { queries, recorded, jobs: pod_monitor_jobs(POD_MONITORS) }
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_for() {
    let rules = rules(RULES).expect("prometheusrule.yaml");
    for r in rules.iter().filter(|r| r.keys.contains("alert")) {
        for key in ["for", "severity", "summary", "description"] {
            assert!(r.keys.contains(key), "alert {} has no {key}", r.name);
        }
    }
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for alert in ["KonnectivityServerNoAgent", "KonnectivityAgentMissingServers", "KonnectivityServerTLSReloadFailed"] {
        assert!(names.contains(&alert), "{alert} missing from {names:?}");
    }
    // The jobs the alerts and the dashboard's defaults expect are the ones the PodMonitors set.
    let jobs = pod_monitor_jobs(POD_MONITORS);
    assert_eq!(jobs, BTreeSet::from(["konnectivity-agent".to_string(), "konnectivity-server".to_string()]));
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    for v in dashboard["templating"]["list"].as_array().expect("variables") {
        if v["name"].as_str().is_some_and(|n| n.ends_with("_job")) {
            let default = v["current"]["value"].as_str().unwrap_or("");
            assert!(jobs.contains(default), "variable {} defaults to {default:?}", v["name"]);
        }
    }
}

#[test]
fn the_promql_scanner_finds_names_labels_and_values() {
    let q = parse_promql(
        "histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{job=~\"$job\", reason=\"x\"}[$__rate_interval])))\n\
         # comment naming not_a_metric\n\
         / on (instance) group_left b{r=~\"p|q\", s!~\"t.*\"} offset 5m > 1e-3 and c unless sum without (k) (d) \
         or vector(0) * topk(5, e) + label_replace(f, \"dst\", \"$1\", \"src\", \"(.*)\")",
    )
    .expect("parses");
    let names: Vec<&str> = q.selectors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a_bucket", "b", "c", "d", "e", "f"]);
    assert_eq!(
        q.selectors[0].1,
        [Matcher { label: "job".into(), values: vec![] }, Matcher { label: "reason".into(), values: vec!["x".into()] }]
    );
    assert_eq!(
        q.selectors[1].1,
        [
            Matcher { label: "r".into(), values: vec!["p".into(), "q".into()] },
            Matcher { label: "s".into(), values: vec![] }
        ]
    );
    assert_eq!(q.grouping, ["le", "instance", "instance", "k"]);
    assert!(parse_promql("{__name__=\"x\"}").is_err());
    assert!(parse_promql("x{a=\"unterminated}").is_err());
    let v = parse_variable_query("label_values(m{job=~\"$j\"}, instance)").expect("variable");
    assert_eq!((v.selectors[0].0.as_str(), v.grouping.as_slice()), ("m", &["instance".to_string()][..]));
}

/// The check reports what is not served: a made-up name, a suffix on a gauge, a label or value the metric does
/// not have, an unknown job, a recorded name no rule records, a grouping label nothing carries.
#[test]
fn the_check_reports_what_the_binaries_do_not_serve() {
    let scrape = "# TYPE konnectivity_network_proxy_server_dial_failure_count counter\n\
        konnectivity_network_proxy_server_dial_failure_count{reason=\"no_agent\"} 1\n\
        # TYPE konnectivity_network_proxy_server_established_connections gauge\n\
        konnectivity_network_proxy_server_established_connections 0\n\
        # TYPE konnectivity_network_proxy_server_dial_duration_seconds histogram\n\
        konnectivity_network_proxy_server_dial_duration_seconds_bucket{le=\"+Inf\"} 1\n\
        konnectivity_network_proxy_server_dial_duration_seconds_count 1\n\
        # TYPE process_open_fds gauge\nprocess_open_fds 9\n";
    let server = parse_scrape(scrape).expect("scrape");
    let agent = parse_scrape("# TYPE process_open_fds gauge\nprocess_open_fds 7\n").expect("scrape");
    let recorded = BTreeMap::from([(
        "konnectivity:recorded".to_string(),
        vec!["konnectivity_network_proxy_server_dial_failure_count".to_string()],
    )]);
    let jobs = BTreeSet::from(["konnectivity-server".to_string()]);
    let known = Known { server: &server, agent: &agent, recorded: &recorded, jobs: &jobs };
    let check = |expr: &str| known.problems(&parse_promql(expr).expect("parses"));

    // Served: these pass.
    for ok in [
        "sum by (reason, instance) (rate(konnectivity_network_proxy_server_dial_failure_count{reason=\"no_agent\"}[5m]))",
        "konnectivity_network_proxy_server_dial_failure_count{reason=~\"no_agent\"}",
        "histogram_quantile(0.9, sum by (le) (rate(konnectivity_network_proxy_server_dial_duration_seconds_bucket[5m])))",
        "rate(konnectivity_network_proxy_server_dial_duration_seconds_count{job=\"konnectivity-server\"}[5m])",
        "process_open_fds > 0 and up{job=\"konnectivity-server\"} == 1",
        "max without (reason) (konnectivity:recorded{reason=\"no_agent\"})",
    ] {
        assert_eq!(check(ok), Vec::<String>::new(), "{ok}");
    }
    // Not served: each one is reported.
    for (bad, problem) in [
        ("konnectivity_network_proxy_server_made_up_total", "is not served by the server"),
        ("rate(konnectivity_network_proxy_agent_dial_failure_count[5m])", "is not served by the agent"),
        ("konnectivity_network_proxy_server_established_connections_count", "is not served by the server"),
        ("konnectivity_network_proxy_server_established_connections_bucket", "is not served by the server"),
        ("konnectivity_network_proxy_server_established_connections{reason=\"x\"}", "serves no label reason"),
        ("konnectivity_network_proxy_server_dial_failure_count{reason=\"no_agnet\"}", "served no reason=\"no_agnet\""),
        ("konnectivity_network_proxy_server_dial_failure_count{reason=~\"no_agent|tiemout\"}", "served no reason"),
        ("up{job=\"konnectivity-srever\"} == 0", "not a job the PodMonitors set"),
        ("up{reason=\"x\"}", "not a target label"),
        ("konnectivity:not_recorded", "no rule records it"),
        ("konnectivity:recorded{reason=\"no_agnet\"}", "served no reason=\"no_agnet\""),
        ("konnectivity:recorded{direction=\"x\"}", "serves no label direction"),
        ("sum by (direction) (konnectivity_network_proxy_server_established_connections)", "label direction"),
        ("tokio_alive_tasks", "is not served by the server"),
    ] {
        let found = check(bad);
        assert!(found.iter().any(|p| p.contains(problem)), "{bad}: expected {problem:?}, got {found:?}");
    }
}

/// Server A and its agent, both reloading TLS files every 100 ms, the server with an audit log: tunneled traffic,
/// a dial the destination refuses, a handshake that is not TLS, the CA bundle changed (usable), broken and restored,
/// and a frontend message too large, which ends its stream.
async fn traffic_handshakes_and_reloads(stack: &Stack) -> (ServerRun, AgentRun) {
    let mut config = stack.server_config(Frontend::Uds);
    config.audit = Some(AuditConfig::new(AuditOutput::File(stack.dir().join("audit.log"))));
    config.tls_reload_interval = Duration::from_millis(100);
    let server = stack.start_server(config).await.expect("server");
    let mut agent_config = stack.agent_config(server.agent_addr);
    agent_config.tls_reload_interval = Duration::from_millis(100);
    let agent = stack.start_agent(agent_config).await.expect("agent");
    eventually!(10, server.handle.ready() && agent.handle.ready(), "agent did not connect");

    let target = http_target("127.0.0.1:0").await.expect("target");
    let host = target.addr.to_string();
    let conn = stack.tunnel(&server).await.expect("tunnel").dial(&host).await.expect("dial");
    let (status, body) = konnectivity_it::http::get(conn, &host, "/bytes/20000").await.expect("GET");
    assert_eq!((status, body.len()), (200, 20000));
    let refused = closed_port().expect("closed port");
    assert!(stack.tunnel(&server).await.expect("tunnel").dial(&refused.addr.to_string()).await.is_err());
    assert_settled(&server, Some(&agent)).await;

    let mut junk = tokio::net::TcpStream::connect(server.agent_addr).await.expect("connect");
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), junk.read_to_end(&mut sink)).await;
    eventually!(
        10,
        exports(server.handle.metrics().registry(), "konnectivity_network_proxy_server_tls_handshake_failures_total"),
        "the broken handshake was not counted"
    );

    let ca = std::fs::read(&stack.pki.ca).expect("read CA");
    let reloads = |result: &'static str| {
        let (s, a) = (server.handle.metrics().tls_reloads("agent", result), agent.handle.metrics().tls_reloads(result));
        s.min(a)
    };
    std::fs::write(&stack.pki.ca, [ca.as_slice(), b"\n"].concat()).expect("write CA");
    eventually!(10, reloads("success") >= 1, "the changed CA was not reloaded");
    std::fs::write(&stack.pki.ca, b"not a certificate\n").expect("write CA");
    eventually!(10, reloads("failure") >= 1, "the broken CA was not counted");
    std::fs::write(&stack.pki.ca, &ca).expect("restore CA");
    eventually!(10, reloads("success") >= 2, "the restored CA was not reloaded");

    send_oversized_frontend_message(&stack.uds).await;
    eventually!(
        10,
        exports(server.handle.metrics().registry(), "konnectivity_network_proxy_server_stream_errors_total"),
        "the oversized frontend message was not counted"
    );
    (server, agent)
}

/// An agent whose stream to `server` goes through a TCP relay that then fails: the agent sees its stream break
/// (the server may see the connection end first, and count nothing).
async fn agent_with_a_cut_stream(stack: &Stack, server: &ServerRun) -> AgentRun {
    let relay = konnectivity_it::targets::tcp_balancer(vec![server.agent_addr]).await.expect("relay");
    let agent = stack.start_agent(stack.agent_config(relay.addr)).await.expect("agent behind the relay");
    eventually!(10, agent.handle.ready(), "the agent behind the relay did not connect");
    drop(relay);
    eventually!(
        10,
        exports(agent.handle.metrics().registry(), "konnectivity_network_proxy_agent_stream_errors_total"),
        "the cut stream was not counted"
    );
    agent
}

/// Waits for the next DIAL_REQ `agent` receives (past the DIAL_CLS of an earlier one).
async fn next_dial_request(agent: &mut FakeAgent) {
    while !matches!(agent.next().await.expect("a packet").kind(), Ok(PacketKind::DialRequest(_))) {}
}

/// Server C, whose only agent takes every dial and never answers: one dial times out (--backend-dial-timeout),
/// the client gives up on one, and the agent goes away with one pending. The destination is never dialed.
async fn dials_nobody_answers(stack: &Stack) -> ServerRun {
    let mut config = stack.server_config(Frontend::Uds);
    config.frontend = FrontendListen::Uds { path: stack.dir().join("c.socket"), delete_existing: true };
    config.backend_dial_timeout = Some(Duration::from_secs(1));
    let server = stack.start_server(config).await.expect("server c");
    let mut silent = FakeAgent::connect(&stack.pki, server.agent_addr, "silent").await.expect("fake agent");
    eventually!(10, server.handle.ready(), "the fake agent was not registered");
    let failures = |reason| server.handle.metrics().dial_failures(reason);
    let destination = "127.0.0.1:9";

    assert!(stack.tunnel(&server).await.expect("tunnel").dial(destination).await.is_err(), "dial timed out");
    next_dial_request(&mut silent).await;
    assert_eq!(failures(DialFailureReason::BackendDialTimeout), 1);

    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let given_up = tokio::spawn(async move { tunnel.dial(destination).await.is_err() });
    next_dial_request(&mut silent).await;
    given_up.abort();
    eventually!(10, failures(DialFailureReason::FrontendClose) == 1, "the client's leaving was not counted");

    let tunnel = stack.tunnel(&server).await.expect("tunnel");
    let orphaned = tokio::spawn(async move { tunnel.dial(destination).await.is_err() });
    next_dial_request(&mut silent).await;
    drop(silent);
    assert!(orphaned.await.expect("dial task"), "a dial whose agent left failed");
    eventually!(10, failures(DialFailureReason::BackendClose) == 1, "the agent's leaving was not counted");
    assert_settled(&server, None).await;
    server
}

/// Server B, which authenticates agents with TokenReviews against a kube-apiserver that is not there, and its
/// agent, whose review fails with an error; with no agent, a dial through it fails with no_agent.
async fn a_token_review_that_fails(stack: &Stack) -> (ServerRun, AgentRun) {
    let kube = closed_port().expect("closed port");
    let kubeconfig = stack.dir().join("unreachable.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster:\n    server: https://{}\n    \
             certificate-authority: {}\ncontexts:\n- name: none\n  context:\n    cluster: none\ncurrent-context: none\n",
            kube.addr,
            stack.pki.ca.display()
        ),
    )
    .expect("kubeconfig");
    let mut config = stack.server_config(Frontend::Uds);
    config.frontend = FrontendListen::Uds { path: stack.dir().join("b.socket"), delete_existing: true };
    config.cluster_ca = None;
    config.kube.kubeconfig = Some(kubeconfig);
    config.agent_auth = Some(AgentAuthConfig::new("kube-system", "konnectivity-agent", "konnectivity"));
    let server = stack.start_server(config).await.expect("server b");
    let token = stack.dir().join("token");
    // Shaped like a JWT, so that it is reviewed (anything else is refused without a review).
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.signature").expect("token");
    let mut agent_config = stack.agent_config(server.agent_addr);
    agent_config.agent_cert = None;
    agent_config.service_account_token_path = Some(token);
    let agent = stack.start_agent(agent_config).await.expect("agent b");
    let reviews_failed = || {
        let text = prometheus::TextEncoder::new().encode_to_string(&server.handle.metrics().registry().gather());
        text.unwrap_or_default().contains("agent_authentications_total{result=\"error\"}")
    };
    eventually!(10, reviews_failed(), "no failed token review was counted");
    assert!(stack.tunnel(&server).await.expect("tunnel").dial("127.0.0.1:9").await.is_err(), "no agent to dial");
    assert_eq!(server.handle.metrics().dial_failures(DialFailureReason::NoAgent), 1);
    (server, agent)
}

/// Every metric and label the dashboard and the alerts use is served by the real server and agent.
#[tokio::test]
async fn the_dashboard_and_the_alerts_query_only_what_the_binaries_serve() {
    let bundle = bundle();
    let stack = Stack::new().expect("pki");
    let (server, agent) = traffic_handshakes_and_reloads(&stack).await;
    let cut_agent = agent_with_a_cut_stream(&stack, &server).await;
    let unanswered = dials_nobody_answers(&stack).await;
    let (token_server, token_agent) = a_token_review_that_fails(&stack).await;

    let mut servers = Vec::new();
    for s in [&server, &unanswered, &token_server] {
        servers.push(scrape(s.health_addr.expect("health port")).await);
    }
    let mut agents = Vec::new();
    for a in [&agent, &cut_agent, &token_agent] {
        agents.push(scrape(a.health_addr.expect("health port")).await);
    }
    for a in [token_agent, cut_agent, agent] {
        a.stop().await;
    }
    for s in [token_server, unanswered, server] {
        s.stop().await;
    }

    let (served_by_server, served_by_agent) = (merge(servers), merge(agents));
    let known =
        Known { server: &served_by_server, agent: &served_by_agent, recorded: &bundle.recorded, jobs: &bundle.jobs };
    let problems = bundle_problems(&known, &bundle.queries);
    assert!(problems.is_empty(), "the monitoring bundle queries what is not served:\n  {}", problems.join("\n  "));
}
