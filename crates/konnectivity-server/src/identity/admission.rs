//! What an agent's credential identity may claim (`--agent-identity-mode`), checked before its stream is
//! accepted:
//! - `trust`: everything, as the reference does;
//! - `strict`: the credential must name a node, and the stream is bound to it;
//! - `auto` (default): bound when the credential names a node, taken on trust (with a warning, once per
//!   identity) when it does not.
//!
//! A bound stream may claim `host` = its node's name or one of its addresses, `ipv4`/`ipv6` = one of its node's
//! addresses (read with a Node GET, cached for a while), and `cidr`, `default-route` (and other host names) only
//! as `--agent-identity-grants` allows. The agent ID is free (agents use UUIDs by default), but while a stream
//! holds it no other identity may claim it, and an identity holds a bounded number of them: the agent registry
//! enforces both (`crate::backend::manager`), from what [`StreamIdentity`] says.

use super::{AgentIdentity, Refusal, RefusalReason, StreamIdentity};
use crate::backend::identifiers::AgentIdentifiers;
use crate::config::{AgentIdentityConfig, IdentityMode};
use konnectivity_kube::node::NodeAddress;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Nodes whose addresses are cached at most (past this, expired entries are dropped and new ones not kept).
const MAX_CACHED_NODES: usize = 20_000;

/// Node reads get a rate-limit budget of their own, apart from the Leases (`--kubeconfig-qps`) and the
/// TokenReviews: thousands of node-bound agents reconnecting after a restart must not starve the server's Lease
/// renewals. Each read waits at most 5 s for a slot; past that the agent is told to come back (`Unavailable`).
const NODE_READS: konnectivity_kube::RequestLimits = konnectivity_kube::RequestLimits {
    qps: 50.0,
    burst: 100,
    max_wait: std::time::Duration::from_secs(5),
    timeout: std::time::Duration::from_secs(10),
};

/// Shared identities warned about at most (each once); past this, no more warnings.
const MAX_WARNED: usize = 1_000;

/// A node's addresses as last read: `None` if the node did not exist.
type CachedNode = (Instant, Option<Arc<Vec<NodeAddress>>>);

/// Checks agent streams' claims against their credential identities.
pub(crate) struct Admission {
    config: AgentIdentityConfig,
    /// To read nodes' addresses; without it a bound stream may claim no address.
    kube: Option<konnectivity_kube::Client>,
    nodes: Mutex<HashMap<String, CachedNode>>,
    warned: Mutex<HashSet<String>>,
    /// A Node read was refused (no RBAC) and said so.
    node_read_forbidden: std::sync::atomic::AtomicBool,
}

impl Admission {
    /// Admission by `config`, reading nodes with `kube` if there is one. Warns at start when shared identities
    /// will be taken on trust.
    pub(crate) fn new(config: AgentIdentityConfig, kube: Option<konnectivity_kube::Client>) -> Self {
        match config.mode {
            IdentityMode::Trust => tracing::warn!(
                "--agent-identity-mode=trust: agents' IDs and identifiers are taken on trust, whatever their \
                 credential: any agent credential can claim any node, address or agent ID (the reference's behaviour)"
            ),
            IdentityMode::Auto => tracing::warn!(
                "--agent-identity-mode=auto: agents whose credential names a node are held to that node; agents \
                 whose credential names no node (a shared certificate or ServiceAccount token) are taken on trust"
            ),
            IdentityMode::Strict => tracing::info!("--agent-identity-mode=strict: every agent is held to its node"),
        }
        if config.mode != IdentityMode::Trust && kube.is_none() {
            tracing::info!(
                "no Kubernetes client (token authentication, leases or --kubeconfig): node-bound agents may claim \
                 host=<their node name> and granted identifiers, but no addresses"
            );
        }
        Self {
            config,
            kube: kube.map(|k| k.with_limits(NODE_READS)),
            nodes: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashSet::new()),
            node_read_forbidden: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether every claim is taken on trust (`--agent-identity-mode=trust`).
    pub(crate) fn trusts_every_claim(&self) -> bool {
        self.config.mode == IdentityMode::Trust
    }

    /// Admits a stream of `identity` claiming `identifiers` (its agent ID is the registry's to check), or says
    /// why not.
    pub(crate) async fn admit(
        &self,
        identity: AgentIdentity,
        identifiers: &AgentIdentifiers,
    ) -> Result<Arc<StreamIdentity>, Refusal> {
        if self.config.mode == IdentityMode::Trust {
            return Ok(StreamIdentity::trusted(identity));
        }
        let Some(node) = identity.node.clone() else {
            if self.config.mode == IdentityMode::Strict {
                return Err(Refusal::new(
                    RefusalReason::NoNodeIdentity,
                    format!("--agent-identity-mode=strict: the agent's {identity} names no node"),
                ));
            }
            self.warn_once(&identity);
            let key = identity.key();
            let max_agent_ids = self.config.max_agent_ids_per_shared_identity;
            return Ok(Arc::new(StreamIdentity { identity, key, owns_agent_ids: true, max_agent_ids }));
        };
        self.check_claims(&identity, &node, identifiers).await?;
        let key = identity.key();
        Ok(Arc::new(StreamIdentity {
            identity,
            key,
            owns_agent_ids: true,
            max_agent_ids: self.config.max_agent_ids_per_node,
        }))
    }

    fn warn_once(&self, identity: &AgentIdentity) {
        let mut warned = self.warned.lock();
        if warned.len() < MAX_WARNED && warned.insert(identity.key()) {
            tracing::warn!(
                identity = %identity,
                "an agent credential that names no node is taken on trust: its agent ID and identifiers are not \
                 checked. Give agents node credentials (a system:node:<name> certificate, or a ServiceAccount token \
                 bound to their pod) and --agent-identity-mode=strict to hold each to its node"
            );
        }
    }

    async fn check_claims(&self, identity: &AgentIdentity, node: &str, ids: &AgentIdentifiers) -> Result<(), Refusal> {
        let grants = &self.config.grants;
        let refuse = |reason, claim: String, why: String| {
            Err(Refusal::new(reason, format!("agent {identity} may not claim {claim}: {why}")))
        };
        for cidr in &ids.cidrs {
            if !grants.allows_cidr(node, cidr) {
                return refuse(RefusalReason::Cidr, format!("cidr={cidr}"), grant_missing(node));
            }
        }
        if ids.default_route && !grants.allows_default_route(node) {
            return refuse(RefusalReason::DefaultRoute, "default-route=true".into(), grant_missing(node));
        }
        let needs_addresses = !ids.ipv4.is_empty()
            || !ids.ipv6.is_empty()
            || ids.hosts.iter().any(|h| !h.eq_ignore_ascii_case(node) && !grants.allows_host(node, h));
        if !needs_addresses {
            return Ok(());
        }
        let looked_up = match self.node_addresses(node).await {
            Ok(addresses) => addresses,
            Err(NodeLookupError::Forbidden(cause)) if self.config.mode == IdentityMode::Auto => {
                // 403: the reference's RBAC has no `get nodes`: in auto mode (the drop-in) the address claims of a
                // bound agent are then taken on trust, as the reference takes them, rather than locking out every
                // agent that claims its address; said loudly, once. Strict mode refuses (below).
                if !self.node_read_forbidden.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        error = %cause,
                        "--agent-identity-mode=auto: this server may not read Nodes (grant it get on nodes), so                          the addresses node-bound agents claim are taken on trust"
                    );
                }
                return Ok(());
            }
            Err(NodeLookupError::Forbidden(cause)) | Err(NodeLookupError::Failed(cause)) => {
                return Err(Refusal::new(
                    RefusalReason::NodeLookup,
                    format!("cannot check the claims of agent {identity}: reading node {node:?}: {cause}"),
                ));
            }
        };
        let Some(addresses) = looked_up else {
            return refuse(
                RefusalReason::UnknownNode,
                "addresses".into(),
                format!("there is no node {node:?} in the cluster"),
            );
        };
        let why = |addresses: &[NodeAddress]| match &self.kube {
            None => "this server has no Kubernetes client to read node addresses with (--kubeconfig); only \
                     host=<node name> can be claimed"
                .to_string(),
            Some(_) => {
                let known: Vec<&str> = addresses.iter().map(|a| a.address.as_str()).collect();
                format!("not node {node}'s name or one of its addresses {known:?}")
            }
        };
        for host in &ids.hosts {
            let own = host.eq_ignore_ascii_case(node)
                || grants.allows_host(node, host)
                || addresses.iter().any(|a| a.address.eq_ignore_ascii_case(host));
            if !own {
                return refuse(RefusalReason::Host, format!("host={host}"), why(&addresses));
            }
        }
        for (key, ip) in ids.ipv4.iter().map(|a| ("ipv4", a)).chain(ids.ipv6.iter().map(|a| ("ipv6", a))) {
            let parsed = ip.parse::<IpAddr>().ok();
            let own = parsed.is_some_and(|p| addresses.iter().any(|a| a.address.parse::<IpAddr>().ok() == Some(p)));
            if !own {
                return refuse(RefusalReason::Address, format!("{key}={ip}"), why(&addresses));
            }
        }
        Ok(())
    }

    /// The node's addresses (empty without a Kubernetes client), `None` if it does not exist; cached for
    /// `--agent-identity-node-cache-ttl`.
    async fn node_addresses(&self, node: &str) -> Result<Option<Arc<Vec<NodeAddress>>>, NodeLookupError> {
        let Some(kube) = &self.kube else { return Ok(Some(Arc::new(Vec::new()))) };
        let now = Instant::now();
        if let Some((until, addresses)) = self.nodes.lock().get(node)
            && *until > now
        {
            return Ok(addresses.clone());
        }
        let addresses = kube.get_node_addresses(node).await.map_err(|e| match e.code() {
            // 401 is the server's own credential failing (mid-rotation, say), not missing RBAC: not a reason to
            // trust anything.
            Some(403) => NodeLookupError::Forbidden(e.to_string()),
            _ => NodeLookupError::Failed(e.to_string()),
        })?;
        let addresses = addresses.map(Arc::new);
        let ttl = self.config.node_cache_ttl;
        if !ttl.is_zero() {
            let mut nodes = self.nodes.lock();
            if nodes.len() >= MAX_CACHED_NODES {
                nodes.retain(|_, (until, _)| *until > now);
            }
            if nodes.len() < MAX_CACHED_NODES {
                nodes.insert(node.to_string(), (now + ttl, addresses.clone()));
            }
        }
        Ok(addresses)
    }
}

/// Why a node's addresses could not be read.
enum NodeLookupError {
    /// kube-apiserver refused the server (no `get` on `nodes`).
    Forbidden(String),
    /// Anything else (kube-apiserver unreachable, throttled, ...).
    Failed(String),
}

fn grant_missing(node: &str) -> String {
    format!("not granted to node {node} in --agent-identity-grants")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::grants::Grants;

    fn admission(mode: IdentityMode, grants: &str) -> Admission {
        let mut config = AgentIdentityConfig::new(mode);
        config.grants = Grants::parse(grants).expect("grants");
        Admission::new(config, None)
    }

    fn node(name: &str) -> AgentIdentity {
        AgentIdentity::of_token("system:serviceaccount:kube-system:konnectivity-agent", Some(name))
    }

    #[tokio::test]
    async fn bound_identities_claim_only_their_own() {
        let a = admission(IdentityMode::Auto, r#"{"grants": [{"node": "gw", "cidr": ["10.0.0.0/8"]}]}"#);
        let ids = |q: &str| AgentIdentifiers::parse(q);
        let ok = a.admit(node("node-a"), &ids("host=node-a")).await.expect("own name");
        assert!(ok.owns_agent_ids && ok.max_agent_ids == 2, "{ok:?}");
        let refused = |r: Result<Arc<StreamIdentity>, Refusal>| r.expect_err("refused");
        let r = refused(a.admit(node("node-a"), &ids("host=node-b")).await);
        assert_eq!(r.reason, RefusalReason::Host);
        assert!(r.message.contains("no Kubernetes client"), "{}", r.message);
        assert_eq!(refused(a.admit(node("node-a"), &ids("ipv4=10.0.0.1")).await).reason, RefusalReason::Address);
        assert_eq!(refused(a.admit(node("node-a"), &ids("cidr=10.0.0.0/8")).await).reason, RefusalReason::Cidr);
        assert_eq!(
            refused(a.admit(node("node-a"), &ids("default-route=true")).await).reason,
            RefusalReason::DefaultRoute
        );
        a.admit(node("gw"), &ids("cidr=10.1.0.0/16")).await.expect("granted");
        // Shared identities are taken on trust in auto mode, refused in strict mode; trust mode checks nothing.
        let shared = AgentIdentity::of_token("system:serviceaccount:kube-system:konnectivity-agent", None);
        let ok = a.admit(shared.clone(), &ids("host=node-b&cidr=0.0.0.0/0")).await.expect("on trust");
        assert!(ok.owns_agent_ids && ok.max_agent_ids == 0);
        let strict = admission(IdentityMode::Strict, r#"{"grants": []}"#);
        assert_eq!(refused(strict.admit(shared.clone(), &ids("")).await).reason, RefusalReason::NoNodeIdentity);
        let trust = admission(IdentityMode::Trust, r#"{"grants": []}"#);
        let ok = trust.admit(node("node-a"), &ids("host=node-b&default-route=true")).await.expect("trust");
        assert!(!ok.owns_agent_ids);
    }
}
