//! Who an agent stream is, by its credential rather than by what it claims (ours; the reference routes on the
//! claims alone): the identity its client certificate or its ServiceAccount token proves ([`AgentIdentity`]),
//! and what that identity may claim in `agentid` and `agentidentifiers` ([`admission`]).
//!
//! The mapping (docs/security.md, "Agent identity"):
//! - a client certificate whose subject common name, or a DNS or URI subject alternative name, is
//!   `system:node:<name>` (the kubelet's convention) names node `<name>`;
//! - a token whose TokenReview carries the `authentication.kubernetes.io/node-name` extra (a ServiceAccount token
//!   projected into a pod, bound to its node) names that node;
//! - anything else names no node: a *shared* identity (one ServiceAccount or certificate for every agent).

pub(crate) mod admission;
pub(crate) mod grants;

use crate::audit::AuditedAgent;
use crate::credentials::CertNames;
use std::fmt;
use std::sync::Arc;

/// The prefix of the names Kubernetes gives node credentials.
pub(crate) const NODE_PREFIX: &str = "system:node:";

/// How the agent proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential {
    /// A client certificate (mTLS agent port).
    Certificate,
    /// A ServiceAccount token, checked with a TokenReview.
    Token,
    /// Nothing: the agent port authenticates no one (neither `--cluster-ca-cert` nor token authentication).
    None,
}

impl Credential {
    /// The `agent_credential` audit field.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Certificate => "certificate",
            Self::Token => "token",
            Self::None => "none",
        }
    }
}

/// The identity an agent stream's credential proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentIdentity {
    /// How it was proved.
    pub(crate) credential: Credential,
    /// The credential's name: the certificate's common name (or its first name if it has none), or the token's
    /// user name; empty without a credential.
    pub(crate) name: String,
    /// The node it names, if any.
    pub(crate) node: Option<String>,
}

/// A credential that names more than one node: refused, since no one can say which node it speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AmbiguousNode(pub(crate) Vec<String>);

impl AgentIdentity {
    /// The identity of a stream without any credential.
    pub(crate) fn anonymous() -> Self {
        Self { credential: Credential::None, name: String::new(), node: None }
    }

    /// The identity a client certificate proves. As Kubernetes reads a client certificate, only the subject's
    /// common name names the user (and so the node: `system:node:<name>`); subject alternative names never do,
    /// so a certificate with CN=alice and a SAN `system:node:victim` is alice, not the victim's node. A subject
    /// with several common names is refused when any names a node: Go (kube-apiserver, CSR approvers) reads the
    /// last and other parsers the first, so no one can say which node it speaks for.
    pub(crate) fn of_certificate(names: &CertNames) -> Result<Self, AmbiguousNode> {
        let name = names.all().next().unwrap_or_default().to_string();
        let nodes: Vec<String> = names
            .common_names
            .iter()
            .filter_map(|cn| cn.strip_prefix(NODE_PREFIX).filter(|n| !n.is_empty()).map(str::to_string))
            .collect();
        if names.common_names.len() > 1 && !nodes.is_empty() {
            return Err(AmbiguousNode(names.common_names.clone()));
        }
        Ok(Self { credential: Credential::Certificate, name, node: nodes.into_iter().next() })
    }

    /// The identity a reviewed ServiceAccount token proves: its user name, and the node it is bound to.
    pub(crate) fn of_token(username: &str, node: Option<&str>) -> Self {
        Self { credential: Credential::Token, name: username.to_string(), node: node.map(str::to_string) }
    }

    /// The key streams of one identity share, for the caps and for owning agent IDs: a node-bound identity is its
    /// node (a certificate and a token of one node are one identity); any other is its credential's name.
    pub(crate) fn key(&self) -> String {
        match (&self.node, self.credential) {
            (Some(node), _) => format!("node:{node}"),
            (None, Credential::None) => "anonymous".to_string(),
            (None, c) => format!("{}:{}", c.as_str(), self.name),
        }
    }
}

impl AgentIdentity {
    /// How the audit log names a stream of this identity with agent ID `id` from `peer`.
    pub(crate) fn audited(&self, id: &str, peer: &str) -> AuditedAgent {
        AuditedAgent {
            id: id.to_string(),
            peer: peer.to_string(),
            credential: self.credential.as_str(),
            identity: self.name.clone(),
            node: self.node.clone(),
        }
    }
}

impl fmt::Display for AgentIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.credential, &self.node) {
            (Credential::None, _) => f.write_str("no credential"),
            (c, Some(node)) => write!(f, "{} {:?} (node {node})", c.as_str(), self.name),
            (c, None) => write!(f, "{} {:?} (shared: names no node)", c.as_str(), self.name),
        }
    }
}

/// What an accepted agent stream is bound to: kept on the stream, read by the agent registry (which enforces the
/// caps) and by the audit log.
#[derive(Debug)]
pub(crate) struct StreamIdentity {
    /// The credential's identity.
    pub(crate) identity: AgentIdentity,
    /// [`AgentIdentity::key`].
    pub(crate) key: String,
    /// Whether the agent IDs this identity's live streams hold are its own: another identity claiming one is
    /// refused (every mode but `trust`).
    pub(crate) owns_agent_ids: bool,
    /// Distinct agent IDs this identity's live streams may hold at once on this server; 0: no limit.
    pub(crate) max_agent_ids: usize,
}

impl StreamIdentity {
    /// How the audit log names a stream of this identity with agent ID `id` from `peer`.
    pub(crate) fn audited(&self, id: &str, peer: &str) -> AuditedAgent {
        self.identity.audited(id, peer)
    }

    /// The reference's behaviour: claims on trust, no caps (the fuzzing harness, `--agent-identity-mode=trust`).
    pub(crate) fn trusted(identity: AgentIdentity) -> Arc<Self> {
        let key = identity.key();
        Arc::new(Self { identity, key, owns_agent_ids: false, max_agent_ids: 0 })
    }
}

/// Why an agent stream was refused for what it claimed (the `reason` label of
/// `agent_identity_refusals_total` and of the `agent_refused` audit line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalReason {
    /// Strict mode, and the credential names no node.
    NoNodeIdentity,
    /// The credential names several nodes.
    AmbiguousIdentity,
    /// The node the credential names does not exist.
    UnknownNode,
    /// A `host` identifier that is not the node's name or one of its addresses.
    Host,
    /// An `ipv4`/`ipv6` identifier that is not one of the node's addresses.
    Address,
    /// A `cidr` identifier not granted to the identity.
    Cidr,
    /// `default-route=true` not granted to the identity.
    DefaultRoute,
    /// The agent ID is held by a live stream of another identity.
    AgentIdTaken,
    /// The identity already holds as many agent IDs as it may.
    AgentIdLimit,
    /// The node's addresses could not be read from kube-apiserver.
    NodeLookup,
}

impl RefusalReason {
    /// The label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NoNodeIdentity => "no_node_identity",
            Self::AmbiguousIdentity => "ambiguous_identity",
            Self::UnknownNode => "unknown_node",
            Self::Host => "host",
            Self::Address => "address",
            Self::Cidr => "cidr",
            Self::DefaultRoute => "default_route",
            Self::AgentIdTaken => "agent_id_taken",
            Self::AgentIdLimit => "agent_id_limit",
            Self::NodeLookup => "node_lookup_error",
        }
    }
}

/// An agent stream refused for what it claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Why, as a label.
    pub(crate) reason: RefusalReason,
    /// What the agent is told (and the log and the audit line say).
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(reason: RefusalReason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }

    /// The gRPC status the agent gets: `PermissionDenied`, or `Unavailable` when kube-apiserver could not say.
    pub(crate) fn status(&self) -> tonic::Status {
        match self.reason {
            RefusalReason::NodeLookup => tonic::Status::unavailable(self.message.clone()),
            _ => tonic::Status::permission_denied(self.message.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cns: &[&str], dns: &[&str]) -> CertNames {
        CertNames {
            common_name: cns.first().map(|s| s.to_string()),
            common_names: cns.iter().map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            uris: Vec::new(),
        }
    }

    #[test]
    fn certificates_map_to_nodes() {
        let id = AgentIdentity::of_certificate(&names(&["system:node:node-a"], &["node-a"])).expect("one node");
        assert_eq!((id.node.as_deref(), id.name.as_str()), (Some("node-a"), "system:node:node-a"));
        assert_eq!(id.key(), "node:node-a");
        // As Kubernetes: only the common name names the user; a SAN never makes a certificate a node's.
        let by_san = AgentIdentity::of_certificate(&names(&["agent"], &["system:node:node-b"])).expect("san");
        assert_eq!((by_san.node.clone(), by_san.key()), (None, "certificate:agent".to_string()));
        let shared = AgentIdentity::of_certificate(&names(&["proxy-agent"], &["localhost"])).expect("shared");
        assert_eq!((shared.node.clone(), shared.key()), (None, "certificate:proxy-agent".to_string()));
        // Several common names, one of them a node's: Go reads the last, others the first; refused.
        let two = AgentIdentity::of_certificate(&names(&["system:node:victim", "system:node:me"], &[]));
        assert_eq!(two, Err(AmbiguousNode(vec!["system:node:victim".into(), "system:node:me".into()])));
        let odd = AgentIdentity::of_certificate(&names(&["alice", "system:node:me"], &[]));
        assert!(odd.is_err(), "{odd:?}");
        let plain = AgentIdentity::of_certificate(&names(&["a", "b"], &[])).expect("no node named");
        assert_eq!(plain.node, None);
        assert_eq!(AgentIdentity::of_certificate(&names(&["system:node:"], &[])).expect("empty").node, None);
        let token = AgentIdentity::of_token("system:serviceaccount:kube-system:konnectivity-agent", Some("node-a"));
        assert_eq!(token.key(), id.key(), "a node's certificate and its bound token are one identity");
        assert_eq!(AgentIdentity::anonymous().key(), "anonymous");
    }
}
