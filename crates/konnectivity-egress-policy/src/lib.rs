//! Egress policy: which destinations tunnels may reach.
//!
//! Every kube-apiserver connection into the cluster passes the proxy-server, so it is the place to close the
//! "API server proxies to arbitrary IPs" class of holes. Rules are evaluated in order and the first that
//! matches decides; when none matches the default decides (`allow` unless the file says otherwise, so an empty
//! policy changes nothing). The server checks before it sends a dial, the agent again after it resolved the
//! name, against every address it would connect to, so a name that resolves into a denied range is refused
//! where the resolution happens.
//!
//! File format (JSON):
//!
//! ```json
//! {
//!   "default": "allow",
//!   "rules": [
//!     {"name": "metadata", "action": "deny", "cidr": ["169.254.0.0/16", "fd00:ec2::254/128"]},
//!     {"name": "kubelets", "action": "allow", "cidr": "10.0.0.0/16", "ports": "10250"},
//!     {"name": "services", "action": "allow", "host": "*.svc.cluster.local", "ports": "443,8443-8450"},
//!     {"name": "no-low-ports", "action": "deny", "ports": "1-1023"}
//!   ]
//! }
//! ```
//!
//! A rule matches when every field it has matches: `cidr` (one or a list) the destination IP, `host` the
//! destination name (`*.example.com` matches any subdomain; case-insensitive), `ports` the port (a list of
//! ports and ranges).

use serde::Deserialize;
use std::net::IpAddr;
use std::path::Path;

/// What a rule or the default does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the dial through.
    Allow,
    /// Refuse the dial.
    Deny,
}

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading egress policy {path}: {cause}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The file is not a valid policy.
    #[error("egress policy {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default = "default_allow")]
    default: Action,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

fn default_allow() -> Action {
    Action::Allow
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    name: Option<String>,
    action: Action,
    #[serde(default)]
    cidr: Option<OneOrMany>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    ports: Option<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    action: Action,
    cidrs: Vec<(IpAddr, u8)>,
    host: Option<String>,
    ports: Vec<(u16, u16)>,
}

/// A loaded policy.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    default: Action,
    rules: Vec<Rule>,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed (or, on the server, not decidable before resolution: the agent decides).
    Allow,
    /// Denied; the text says by what, for the error message and the log.
    Deny(String),
}

/// The error text prefix of a denied dial (frontends and the HTTP CONNECT status mapping match on it).
pub const DENIED: &str = "denied by egress policy";

impl EgressPolicy {
    /// A policy that allows everything (the reference's behaviour).
    pub fn allow_all() -> Self {
        Self { default: Action::Allow, rules: Vec::new() }
    }

    /// The policy an `--egress-policy-file` flag names: the file's, or [`EgressPolicy::allow_all`] when the flag
    /// is empty (its default).
    pub fn from_flag(file: &str) -> Result<std::sync::Arc<Self>, PolicyError> {
        let policy = if file.is_empty() { Self::allow_all() } else { Self::load(Path::new(file))? };
        Ok(std::sync::Arc::new(policy))
    }

    /// Loads a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| PolicyError::Read { path: display.clone(), cause })?;
        Self::parse(&text).map_err(|reason| PolicyError::Invalid { path: display, reason })
    }

    /// Parses a policy from JSON text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut rules = Vec::new();
        for (i, r) in file.rules.into_iter().enumerate() {
            let name = r.name.unwrap_or_else(|| format!("rule {}", i + 1));
            let cidrs = match r.cidr {
                None => Vec::new(),
                Some(OneOrMany::One(c)) => vec![parse_cidr(&c).map_err(|e| format!("{name}: {e}"))?],
                Some(OneOrMany::Many(cs)) => {
                    cs.iter().map(|c| parse_cidr(c).map_err(|e| format!("{name}: {e}"))).collect::<Result<_, _>>()?
                }
            };
            let ports = match r.ports {
                None => Vec::new(),
                Some(p) => parse_ports(&p).map_err(|e| format!("{name}: {e}"))?,
            };
            let host = r.host.map(|h| h.to_ascii_lowercase());
            if cidrs.is_empty() && host.is_none() && ports.is_empty() {
                return Err(format!("{name}: a rule needs at least one of cidr, host, ports"));
            }
            rules.push(Rule { name, action: r.action, cidrs, host, ports });
        }
        Ok(Self { default: file.default, rules })
    }

    /// The check before any name is resolved (on the server, and on the agent before it resolves): `host` is
    /// the dial's host (a name or an IP literal). A rule that needs the IP of a name cannot be decided here:
    /// an undecidable *allow* rule hands the decision to the resolved check (allow for now), while an
    /// undecidable *deny* rule is skipped, since whether it matches or not the outcome is a denial unless a
    /// later rule allows. So a name is denied here only when every possible outcome is a denial.
    pub fn check_before_resolution(&self, host: &str, port: u16) -> Verdict {
        let ip = host.parse::<IpAddr>().ok();
        for rule in &self.rules {
            if !rule.port_matches(port) || !rule.host_matches(host) {
                continue;
            }
            if !rule.cidrs.is_empty() {
                match ip {
                    Some(ip) if rule.cidr_matches(ip) => {}
                    Some(_) => continue,
                    None if rule.action == Action::Allow => return Verdict::Allow,
                    None => continue,
                }
            }
            return rule.verdict();
        }
        self.default_verdict()
    }

    /// The agent's check, for one address a name resolved to.
    pub fn check_resolved(&self, host: &str, ip: IpAddr, port: u16) -> Verdict {
        for rule in &self.rules {
            if rule.port_matches(port) && rule.host_matches(host) && (rule.cidrs.is_empty() || rule.cidr_matches(ip)) {
                return rule.verdict();
            }
        }
        self.default_verdict()
    }

    fn default_verdict(&self) -> Verdict {
        match self.default {
            Action::Allow => Verdict::Allow,
            Action::Deny => Verdict::Deny(format!("{DENIED}: no rule allows it (default deny)")),
        }
    }
}

impl Rule {
    fn verdict(&self) -> Verdict {
        match self.action {
            Action::Allow => Verdict::Allow,
            Action::Deny => Verdict::Deny(format!("{DENIED}: {}", self.name)),
        }
    }

    fn port_matches(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port))
    }

    fn host_matches(&self, host: &str) -> bool {
        let Some(pattern) = &self.host else { return true };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match pattern.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host[..host.len() - suffix.len()].ends_with('.')
            }
            None => host == *pattern,
        }
    }

    fn cidr_matches(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        self.cidrs.iter().any(|(net, bits)| prefix_match(*net, *bits, ip))
    }
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (net, bits) = s.split_once('/').unwrap_or((s, ""));
    let net: IpAddr = net.trim().parse().map_err(|_| format!("bad CIDR {s:?}"))?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let bits = if bits.is_empty() { max } else { bits.trim().parse::<u8>().map_err(|_| format!("bad CIDR {s:?}"))? };
    if bits > max {
        return Err(format!("bad CIDR {s:?}: prefix longer than the address"));
    }
    Ok((net, bits))
}

fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (lo, hi) = p.split_once('-').unwrap_or((p, p));
            let lo: u16 = lo.trim().parse().map_err(|_| format!("bad port {p:?}"))?;
            let hi: u16 = hi.trim().parse().map_err(|_| format!("bad port {p:?}"))?;
            if lo > hi {
                return Err(format!("bad port range {p:?}"));
            }
            Ok((lo, hi))
        })
        .collect()
}

fn prefix_match(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    let (net, ip, width) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(u32::from(n)), u128::from(u32::from(i)), 32u32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    if shift >= 128 {
        return true;
    }
    (net >> shift) == (ip >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{
        "rules": [
            {"name": "metadata", "action": "deny", "cidr": ["169.254.0.0/16", "fd00:ec2::254"]},
            {"name": "kubelets", "action": "allow", "cidr": "10.0.0.0/16", "ports": "10250"},
            {"name": "services", "action": "allow", "host": "*.svc.cluster.local", "ports": "443, 8443-8450"},
            {"action": "deny", "ports": "1-1023"}
        ]
    }"#;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn first_match_decides_default_allows() {
        let p = EgressPolicy::parse(POLICY).expect("policy");
        assert_eq!(
            p.check_resolved("169.254.169.254", ip("169.254.169.254"), 80),
            Verdict::Deny(format!("{DENIED}: metadata"))
        );
        assert_eq!(
            p.check_resolved("::ffff:169.254.1.1", ip("::ffff:169.254.1.1"), 80),
            Verdict::Deny(format!("{DENIED}: metadata"))
        );
        assert_eq!(p.check_resolved("10.0.3.4", ip("10.0.3.4"), 10250), Verdict::Allow);
        assert_eq!(p.check_resolved("10.0.3.4", ip("10.0.3.4"), 22), Verdict::Deny(format!("{DENIED}: rule 4")));
        assert_eq!(p.check_resolved("api.default.svc.cluster.local", ip("10.96.0.1"), 443), Verdict::Allow);
        assert_eq!(
            p.check_resolved("svc.cluster.local", ip("10.96.0.1"), 443),
            Verdict::Deny(format!("{DENIED}: rule 4"))
        );
        assert_eq!(p.check_resolved("x", ip("192.0.2.1"), 8080), Verdict::Allow);
    }

    #[test]
    fn the_server_defers_what_needs_resolution() {
        let p = EgressPolicy::parse(POLICY).expect("policy");
        // A name that an allow rule with a CIDR could match: the agent decides, after resolution.
        assert_eq!(p.check_before_resolution("metadata.internal", 10250), Verdict::Allow);
        // A name every outcome denies: whether or not it resolves into 169.254/16 (deny), port 80 is denied by
        // rule 4 anyway, so the server refuses it at once (and no resolver is asked).
        assert_eq!(p.check_before_resolution("metadata.internal", 80), Verdict::Deny(format!("{DENIED}: rule 4")));
        // IP literals are decided on the server.
        assert_eq!(p.check_before_resolution("169.254.169.254", 80), Verdict::Deny(format!("{DENIED}: metadata")));
        assert_eq!(p.check_before_resolution("10.0.0.9", 10250), Verdict::Allow);
        let strict =
            EgressPolicy::parse(r#"{"default": "deny", "rules": [{"action": "allow", "host": "ok.example"}]}"#)
                .expect("policy");
        assert_eq!(strict.check_before_resolution("ok.example", 1), Verdict::Allow);
        assert!(matches!(strict.check_before_resolution("other.example", 1), Verdict::Deny(_)));
    }

    #[test]
    fn bad_files_are_explained() {
        assert!(
            EgressPolicy::parse(r#"{"rules": [{"action": "deny", "cidr": "10.0.0.0/40"}]}"#)
                .unwrap_err()
                .contains("prefix longer")
        );
        assert!(EgressPolicy::parse(r#"{"rules": [{"action": "deny"}]}"#).unwrap_err().contains("needs at least one"));
        assert!(EgressPolicy::parse(r#"{"rules": [{"action": "maybe", "ports": "1"}]}"#).is_err());
        assert!(EgressPolicy::parse(r#"{"rulez": []}"#).is_err());
        assert!(
            EgressPolicy::parse(r#"{"rules": [{"action": "deny", "ports": "9-1"}]}"#)
                .unwrap_err()
                .contains("bad port range")
        );
        assert_eq!(EgressPolicy::allow_all().check_before_resolution("anything", 1), Verdict::Allow);
    }
}
