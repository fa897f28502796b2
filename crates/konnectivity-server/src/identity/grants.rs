//! `--agent-identity-grants`: what node-bound agent identities may claim beyond their own node's name and
//! addresses: `cidr` ranges, `default-route`, and extra `host` names. A JSON file:
//!
//! ```json
//! {"grants": [
//!   {"node": "egress-gw-1", "default-route": true, "cidr": ["10.0.0.0/8", "fd00::/8"]},
//!   {"node": "*", "host": ["metrics.internal"]}
//! ]}
//! ```
//!
//! A grant for `"node": "*"` applies to every node. A claimed CIDR is allowed when a granted one contains it.

use serde::Deserialize;
use std::net::IpAddr;
use std::path::Path;

/// One grant, as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    node: String,
    #[serde(default)]
    cidr: Vec<String>,
    #[serde(default, rename = "default-route")]
    default_route: bool,
    #[serde(default)]
    host: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsFile {
    grants: Vec<GrantSpec>,
}

/// An IP prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128).
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (net, bits) = match s.split_once('/') {
            Some((n, b)) => (n.parse::<IpAddr>().ok()?, b.parse::<u8>().ok()?),
            None => {
                let ip = s.parse::<IpAddr>().ok()?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        (bits <= width(net)).then_some(Self { net, bits })
    }

    /// Whether `other` lies within this prefix.
    pub(crate) fn contains(&self, other: &Cidr) -> bool {
        other.bits >= self.bits && same_prefix(self.net, other.net, self.bits)
    }
}

fn width(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn same_prefix(a: IpAddr, b: IpAddr, bits: u8) -> bool {
    let (a, b) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)) << 96, u128::from(u32::from(b)) << 96),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b)),
        _ => return false,
    };
    let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
    a & mask == b & mask
}

/// One node's grant (or every node's, for `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    node: String,
    cidrs: Vec<Cidr>,
    default_route: bool,
    hosts: Vec<String>,
}

/// The loaded grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    grants: Vec<Grant>,
}

impl Grants {
    /// Reads the file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: GrantsFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut grants = Vec::new();
        for (i, spec) in file.grants.into_iter().enumerate() {
            if spec.node.is_empty() {
                return Err(format!("grant {}: \"node\" is empty (use \"*\" for every node)", i + 1));
            }
            let cidrs = spec
                .cidr
                .iter()
                .map(|c| Cidr::parse(c).ok_or_else(|| format!("grant {} ({}): {c:?} is not a CIDR", i + 1, spec.node)))
                .collect::<Result<Vec<_>, _>>()?;
            grants.push(Grant { node: spec.node, cidrs, default_route: spec.default_route, hosts: spec.host });
        }
        Ok(Self { grants })
    }

    fn for_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Grant> + 'a {
        self.grants.iter().filter(move |g| g.node == "*" || g.node == node)
    }

    /// Whether `node` may claim the CIDR `claimed`.
    pub(crate) fn allows_cidr(&self, node: &str, claimed: &str) -> bool {
        let Some(claimed) = Cidr::parse(claimed) else { return false };
        self.for_node(node).any(|g| g.cidrs.iter().any(|c| c.contains(&claimed)))
    }

    /// Whether `node` may claim `default-route=true`.
    pub(crate) fn allows_default_route(&self, node: &str) -> bool {
        self.for_node(node).any(|g| g.default_route)
    }

    /// Whether `node` may claim `host=<host>` beyond its own names.
    pub(crate) fn allows_host(&self, node: &str, host: &str) -> bool {
        self.for_node(node).any(|g| g.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_and_match() {
        let g = Grants::parse(
            r#"{"grants": [{"node": "gw", "default-route": true, "cidr": ["10.0.0.0/8", "fd00::/8"]},
                           {"node": "*", "host": ["metrics.internal"]}]}"#,
        )
        .expect("grants");
        assert!(g.allows_cidr("gw", "10.1.0.0/16"));
        assert!(g.allows_cidr("gw", "10.0.0.0/8"));
        assert!(g.allows_cidr("gw", "fd00:1::/32"));
        assert!(!g.allows_cidr("gw", "0.0.0.0/0"), "wider than granted");
        assert!(!g.allows_cidr("gw", "11.0.0.0/8"));
        assert!(!g.allows_cidr("other", "10.1.0.0/16"));
        assert!(!g.allows_cidr("gw", "garbage"));
        assert!(g.allows_default_route("gw") && !g.allows_default_route("other"));
        assert!(g.allows_host("other", "METRICS.internal") && !g.allows_host("other", "x"));
        assert!(Grants::parse(r#"{"grants": [{"node": "a", "cidr": ["10.0.0.0/33"]}]}"#).is_err());
        assert!(Grants::parse(r#"{"grants": [{"node": ""}]}"#).is_err());
        assert!(Grants::parse(r#"{"grants": [{"node": "a", "cidrs": []}]}"#).is_err(), "unknown field");
        assert_eq!(Cidr::parse("10.0.0.1"), Cidr::parse("10.0.0.1/32"));
    }
}
