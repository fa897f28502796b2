//! Choosing an agent for a dial: the reference's strategies (`default`, `destHost`, `defaultRoute`) tried in
//! `--proxy-strategies` order, and `destCIDR`, which the reference parses identifiers for but never uses.
//!
//! Among the agents a strategy allows, agents that sent DRAIN are used only when no other is left (as the
//! reference; a strategy never falls through to the next one because its agents are draining), and beyond the
//! reference the least-loaded one (fewest open connections) wins, ties broken at random, instead of a purely
//! random pick. For `destCIDR`, draining outweighs specificity: a non-draining agent with a wider matching
//! prefix is preferred to a draining one with a narrower prefix.

use crate::backend::stream::Backend;
use rand::Rng;
use std::net::IpAddr;
use std::sync::Arc;

pub use crate::config::Strategy;

/// Whether `agent` can serve under `strategy` at all (for readiness and `ready_backends`).
pub(crate) fn serves(strategy: Strategy, agent: &Backend) -> bool {
    let ids = &agent.identifiers;
    match strategy {
        Strategy::Default => true,
        Strategy::DestHost => !(ids.hosts.is_empty() && ids.ipv4.is_empty() && ids.ipv6.is_empty()),
        Strategy::DefaultRoute => ids.default_route,
        Strategy::DestCidr => !ids.cidrs.is_empty(),
    }
}

/// How well `agent` matches a dial to `host` under `strategy`: `None` if it does not, else a rank (higher is
/// better; only `destCIDR` ranks, by prefix length).
fn rank(strategy: Strategy, agent: &Backend, host: &str, ip: Option<IpAddr>) -> Option<u8> {
    let ids = &agent.identifiers;
    match strategy {
        Strategy::Default => Some(0),
        Strategy::DestHost => {
            let hit = ids.hosts.iter().chain(&ids.ipv4).chain(&ids.ipv6).any(|h| h == host);
            hit.then_some(0)
        }
        Strategy::DefaultRoute => ids.default_route.then_some(0),
        Strategy::DestCidr => {
            let ip = ip?;
            ids.cidrs.iter().filter_map(|c| cidr_contains(c, ip)).max()
        }
    }
}

/// The host part of a dial address (`host:port`, `[v6]:port`), as the reference strips it.
pub fn dial_host(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h).unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((h, _)) if !h.contains(':') => h,
        _ => address,
    }
}

/// The prefix length if `cidr` (like `10.0.0.0/8`) contains `ip`.
fn cidr_contains(cidr: &str, ip: IpAddr) -> Option<u8> {
    let (net, bits) = cidr.split_once('/')?;
    let net: IpAddr = net.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let (net, ip, width) = match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(u32::from(n)) << 96, u128::from(u32::from(i)) << 96, 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return None,
    };
    if bits > width {
        return None;
    }
    let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
    (net & mask == ip & mask).then_some(bits)
}

/// Picks among `agents` (one stream per agent ID) for a dial to `address`, trying `strategies` in order.
pub(crate) fn pick(strategies: &[Strategy], agents: &[Arc<Backend>], address: &str) -> Option<Arc<Backend>> {
    let host = dial_host(address);
    let ip = host.parse::<IpAddr>().ok();
    for strategy in strategies {
        let ranked: Vec<(u8, &Arc<Backend>)> =
            agents.iter().filter_map(|a| rank(*strategy, a, host, ip).map(|r| (r, a))).collect();
        if ranked.is_empty() {
            continue;
        }
        let live: Vec<(u8, &Arc<Backend>)> = ranked.iter().copied().filter(|(_, a)| !a.is_draining()).collect();
        let eligible = if live.is_empty() { ranked } else { live };
        let best_rank = eligible.iter().map(|(r, _)| *r).max().unwrap_or(0);
        let best: Vec<&Arc<Backend>> = eligible.into_iter().filter(|(r, _)| *r == best_rank).map(|(_, a)| a).collect();
        return least_loaded(&best);
    }
    None
}

fn least_loaded(pool: &[&Arc<Backend>]) -> Option<Arc<Backend>> {
    if pool.is_empty() {
        return None;
    }
    let start = rand::rng().random_range(0..pool.len());
    let mut best: Option<(usize, &Arc<Backend>)> = None;
    for i in 0..pool.len() {
        let agent = pool[(start + i) % pool.len()];
        let load = agent.connection_count();
        if best.is_none_or(|(l, _)| load < l) {
            best = Some((load, agent));
        }
    }
    best.map(|(_, a)| a.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_prefixes() {
        assert_eq!(dial_host("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(dial_host("[fd00::1]:10250"), "fd00::1");
        assert_eq!(dial_host("node-a.cluster.local:10250"), "node-a.cluster.local");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(cidr_contains("10.0.0.0/8", ip("10.1.2.3")), Some(8));
        assert_eq!(cidr_contains("10.1.0.0/16", ip("10.1.2.3")), Some(16));
        assert_eq!(cidr_contains("10.1.0.0/16", ip("10.2.2.3")), None);
        assert_eq!(cidr_contains("0.0.0.0/0", ip("192.0.2.1")), Some(0));
        assert_eq!(cidr_contains("fd00::/8", ip("fd00::1")), Some(8));
        assert_eq!(cidr_contains("fd00::/8", ip("10.0.0.1")), None);
        assert_eq!(cidr_contains("10.0.0.0/33", ip("10.0.0.1")), None);
        assert_eq!(cidr_contains("garbage", ip("10.0.0.1")), None);
    }

    #[test]
    fn strategy_names() {
        for s in [Strategy::Default, Strategy::DestHost, Strategy::DefaultRoute, Strategy::DestCidr] {
            assert_eq!(Strategy::parse(s.name()), Some(s));
        }
        assert_eq!(Strategy::parse("random"), None);
    }
}
