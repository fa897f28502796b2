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
    /// `"deny-unless-host-rule"`: a dial to a name (not an IP literal) is denied unless a rule with a `host`
    /// pattern that matches it allows it.
    #[serde(default)]
    names: Option<String>,
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
    /// Names are denied unless a `host` rule allows them.
    names_need_host_rule: bool,
    rules: Vec<Rule>,
}

/// The check of a dial's destination before any name is resolved, on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreCheck {
    /// What can be decided now.
    pub verdict: Verdict,
    /// Allowed so far, but the outcome depends on what the name resolves to: only an agent that enforces this
    /// same policy after resolving may be given it.
    pub needs_resolution: bool,
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
        Self { default: Action::Allow, names_need_host_rule: false, rules: Vec::new() }
    }

    /// Whether this policy allows everything (no file, or a file without rules whose default allows).
    pub fn allows_everything(&self) -> bool {
        self.rules.is_empty() && self.default == Action::Allow && !self.names_need_host_rule
    }

    /// A fingerprint of what the policy decides (its rules, default and name handling, not the file's spelling):
    /// an agent advertises it, so that a server gives names to resolve only to agents that enforce the same
    /// policy.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut canonical = format!("default={:?};names={};", self.default, self.names_need_host_rule);
        for r in &self.rules {
            canonical.push_str(&format!("rule={:?}|{:?}|{:?}|{:?};", r.action, r.cidrs, r.host, r.ports));
        }
        let digest = Sha256::digest(canonical.as_bytes());
        format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
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
        let names_need_host_rule = match file.names.as_deref() {
            None | Some("allow") => false,
            Some("deny-unless-host-rule") => true,
            Some(other) => return Err(format!("names: {other:?} (want \"allow\" or \"deny-unless-host-rule\")")),
        };
        Ok(Self { default: file.default, names_need_host_rule, rules })
    }

    /// The check before any name is resolved (on the server, and on the agent before it resolves): `host` is
    /// the dial's host (a name or an IP literal). A rule that needs the IP of a name cannot be decided here:
    /// an undecidable *allow* rule hands the decision to the resolved check (allow for now), while an
    /// undecidable *deny* rule is skipped, since whether it matches or not the outcome is a denial unless a
    /// later rule allows. So a name is denied here only when every possible outcome is a denial.
    pub fn check_before_resolution(&self, host: &str, port: u16) -> Verdict {
        self.pre_check(host, port).verdict
    }

    /// [`EgressPolicy::check_before_resolution`], saying also whether an allowed name's outcome depends on
    /// what it resolves to.
    pub fn pre_check(&self, host: &str, port: u16) -> PreCheck {
        let ip = literal_ip(host);
        let allow = |needs_resolution| PreCheck { verdict: Verdict::Allow, needs_resolution };
        let deny = |v: Verdict| PreCheck { verdict: v, needs_resolution: false };
        if ip.is_none() && self.names_need_host_rule && !self.host_rule_allows(host, port) {
            return deny(Verdict::Deny(format!("{DENIED}: names need a host rule that allows them")));
        }
        let mut depends = false;
        for rule in &self.rules {
            if !rule.port_matches(port) || !rule.host_matches(host) {
                continue;
            }
            if !rule.cidrs.is_empty() {
                match ip {
                    Some(ip) if rule.cidr_matches(ip) => {}
                    Some(_) => continue,
                    None if rule.action == Action::Allow => return allow(true),
                    None => {
                        depends = true;
                        continue;
                    }
                }
            }
            return match rule.verdict() {
                Verdict::Allow => allow(depends),
                denied => deny(denied),
            };
        }
        match self.default_verdict() {
            Verdict::Allow => allow(depends),
            denied => deny(denied),
        }
    }

    /// Whether a rule with a `host` pattern matching `host` allows it on `port` (names-need-a-host-rule mode).
    fn host_rule_allows(&self, host: &str, port: u16) -> bool {
        self.rules
            .iter()
            .find(|r| r.host.is_some() && r.port_matches(port) && r.host_matches(host))
            .is_some_and(|r| r.action == Action::Allow)
    }

    /// The agent's check, for one address a name resolved to.
    pub fn check_resolved(&self, host: &str, ip: IpAddr, port: u16) -> Verdict {
        if literal_ip(host).is_none() && self.names_need_host_rule && !self.host_rule_allows(host, port) {
            return Verdict::Deny(format!("{DENIED}: names need a host rule that allows them"));
        }
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

    /// Whether a CIDR of the rule holds `ip`, or the address a connection to `ip` really reaches: Linux connects
    /// an unspecified address (`0.0.0.0/8`, `::`, their IPv4-mapped forms) to the local host, so for the policy
    /// they are loopback addresses too.
    fn cidr_matches(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        self.cidrs.iter().any(|(net, bits)| {
            prefix_match(*net, *bits, ip) || reaches(ip).iter().any(|r| prefix_match(*net, *bits, *r))
        })
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Where a connection to `ip` goes besides `ip` itself: the loopback addresses, for an unspecified address.
fn reaches(ip: IpAddr) -> &'static [IpAddr] {
    const LOOPBACK: [IpAddr; 2] =
        [IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)];
    let unspecified = match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified(),
    };
    if unspecified { &LOOPBACK } else { &[] }
}

/// The IP a dial's host stands for without a resolver: an IP literal, or `localhost` and its subdomains
/// (RFC 6761: always the loopback address, whatever a resolver says).
fn literal_ip(host: &str) -> Option<IpAddr> {
    let host = host.trim_end_matches('.');
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
    host.parse().ok()
}

/// Why a dial address must be refused before any agent sees it, when a policy is in force: forms that the
/// agent's resolver or socket layer would read as an address the policy cannot see (numeric shorthand such as
/// `127.1` or `2130706433`, octal or hexadecimal parts, zone IDs), or a port that is not one.
pub fn unsafe_address_form(address: &str) -> Option<String> {
    let (host, port) = match address.strip_prefix('[') {
        Some(rest) => match rest.split_once("]:") {
            Some((h, p)) => (h, p),
            None => return Some(format!("{address:?}: not host:port")),
        },
        None => match address.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, p),
            _ => return Some(format!("{address:?}: not host:port (an IPv6 address needs brackets)")),
        },
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err() {
        return Some(format!("{address:?}: invalid port"));
    }
    if host.is_empty() {
        return Some(format!("{address:?}: no host"));
    }
    if host.contains('%') {
        return Some(format!("{address:?}: IPv6 zone IDs are not allowed"));
    }
    let numeric = host.trim_end_matches('.').split('.').all(|part| {
        let hex = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X"));
        !part.is_empty()
            && match hex {
                Some(h) => h.bytes().all(|b| b.is_ascii_hexdigit()),
                None => part.bytes().all(|b| b.is_ascii_digit()),
            }
    });
    if numeric && host.parse::<IpAddr>().is_err() {
        return Some(format!(
            "{address:?}: a numeric host that is not a dotted-quad IPv4 address (resolvers read it as one)"
        ));
    }
    None
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

    #[test]
    fn unspecified_addresses_are_loopback() {
        let p = EgressPolicy::parse(
            r#"{"rules": [{"name": "loopback", "action": "deny", "cidr": ["127.0.0.0/8", "::1/128"]}]}"#,
        )
        .expect("policy");
        for host in ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0", "127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = host.parse().expect("ip");
            assert!(matches!(p.check_resolved(host, ip, 80), Verdict::Deny(_)), "{host} resolved");
            assert!(matches!(p.check_before_resolution(host, 80), Verdict::Deny(_)), "{host} before resolution");
        }
        for host in ["localhost", "LOCALHOST.", "a.localhost"] {
            assert!(matches!(p.check_before_resolution(host, 80), Verdict::Deny(_)), "{host}");
        }
        assert_eq!(p.check_resolved("10.0.0.1", ip("10.0.0.1"), 80), Verdict::Allow);
    }

    #[test]
    fn unsafe_forms_are_named() {
        for bad in [
            "127.1:80",
            "2130706433:80",
            "0:80",
            "0x7f.0.0.1:80",
            "0177.0.0.1:80",
            "010.0.0.1:80",
            "[::1%1]:80",
            "[fe80::1%eth0]:80",
            "host:99999",
            "host:8o",
            "host:",
            ":80",
            "::1:80",
            "host",
        ] {
            assert!(unsafe_address_form(bad).is_some(), "{bad} passed");
        }
        for good in ["127.0.0.1:80", "10.0.0.5:10250", "[::1]:443", "node-a.example:10250", "a1.b2:80", "1a.example:80"]
        {
            assert_eq!(unsafe_address_form(good), None, "{good} refused");
        }
    }

    #[test]
    fn names_can_require_a_host_rule() {
        let p = EgressPolicy::parse(
            r#"{"names": "deny-unless-host-rule", "rules": [{"action": "allow", "host": "*.svc.cluster.local"}]}"#,
        )
        .expect("policy");
        assert_eq!(p.check_before_resolution("kubernetes.default.svc.cluster.local", 443), Verdict::Allow);
        assert!(matches!(p.check_before_resolution("evil.example", 443), Verdict::Deny(_)));
        assert!(matches!(p.check_resolved("evil.example", ip("10.0.0.1"), 443), Verdict::Deny(_)));
        assert_eq!(p.check_before_resolution("10.0.0.1", 443), Verdict::Allow);
    }

    #[test]
    fn whether_resolution_matters_and_fingerprints() {
        let p = EgressPolicy::parse(POLICY).expect("policy");
        assert!(p.pre_check("node-a.example", 10250).needs_resolution);
        assert!(!p.pre_check("10.0.0.9", 10250).needs_resolution);
        let ports_only = EgressPolicy::parse(r#"{"rules": [{"action": "deny", "ports": "22"}]}"#).expect("policy");
        assert!(!ports_only.pre_check("node-a.example", 10250).needs_resolution);
        let again = EgressPolicy::parse(&POLICY.replace("    ", " ")).expect("policy");
        assert_eq!(p.fingerprint(), again.fingerprint(), "spelling must not change the fingerprint");
        assert_ne!(p.fingerprint(), ports_only.fingerprint());
        assert!(EgressPolicy::allow_all().allows_everything());
        assert!(!p.allows_everything());
    }
}
