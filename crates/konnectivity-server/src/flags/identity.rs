//! The agent identity flags (ours; docs/security.md, "Agent identity").

use crate::config::{AgentIdentityConfig, IdentityMode};
use crate::identity::grants::Grants;
use clap::Args;
use konnectivity_process::flags::{FlagError, go_duration};
use std::time::Duration;

/// How agents' claims (`agentid`, `agentidentifiers`) are tied to their credentials.
#[derive(Debug, Clone, Args)]
pub struct IdentityFlags {
    /// How an agent's claims are tied to its credential. A credential names a node when its client certificate's
    /// common name (or a DNS/URI SAN) is system:node:<name>, or when it is a ServiceAccount token bound to a pod
    /// on that node (the TokenReview's authentication.kubernetes.io/node-name). Such an agent may claim host=<its
    /// node name or addresses>, ipv4/ipv6=<its node's addresses>, cidr and default-route only as
    /// --agent-identity-grants allows; an agent ID held by a connected agent of another identity is refused.
    /// auto (default): bind agents whose credential names a node, take the others (one certificate or
    /// ServiceAccount shared by all agents) on trust, with a warning. strict: every agent's credential must name
    /// a node. trust: take every claim on trust, as the reference (ours).
    #[arg(long, default_value = "auto", value_parser = ["auto", "strict", "trust"], value_name = "auto|strict|trust")]
    pub agent_identity_mode: String,
    /// JSON file granting node identities what their node's names and addresses do not give them: cidr ranges,
    /// default-route, extra host names, e.g. {"grants": [{"node": "egress-1", "default-route": true, "cidr":
    /// ["10.0.0.0/8"]}]} ("node": "*" is every node). Empty: no grants (ours).
    #[arg(long, default_value = "", value_name = "path")]
    pub agent_identity_grants: String,
    /// Distinct agent IDs the connected agents of one node identity may hold at once on this server (an agent, and
    /// the same agent restarted under a new ID before its old stream is found dead); 0: no limit (ours).
    #[arg(long, default_value_t = crate::config::DEFAULT_MAX_AGENT_IDS_PER_NODE, value_name = "n")]
    pub max_agent_ids_per_node: usize,
    /// Distinct agent IDs the connected agents of one shared identity (a credential naming no node, such as the
    /// one ServiceAccount of a DaemonSet) may hold at once on this server; 0 (the default): no limit, as every
    /// agent of the DaemonSet uses it. Not applied with --agent-identity-mode=trust (ours).
    #[arg(long, default_value_t = 0, value_name = "n")]
    pub max_agent_ids_per_shared_identity: usize,
    /// How long a node's addresses, read from kube-apiserver to check what its agents claim, are reused; 0 reads
    /// them for every agent stream that claims an address (ours).
    #[arg(long, value_parser = go_duration, default_value = "1m0s")]
    pub agent_identity_node_cache_ttl: Duration,
}

impl IdentityFlags {
    /// The configuration the flags describe.
    pub fn config(&self) -> Result<AgentIdentityConfig, FlagError> {
        let mode = IdentityMode::parse(&self.agent_identity_mode).ok_or_else(|| {
            FlagError::invalid(format!(
                "--agent-identity-mode must be auto, strict or trust, got {:?}",
                self.agent_identity_mode
            ))
        })?;
        let mut config = AgentIdentityConfig::new(mode);
        if !self.agent_identity_grants.is_empty() {
            config.grants = Grants::load(std::path::Path::new(&self.agent_identity_grants))
                .map_err(|e| FlagError::invalid(format!("--agent-identity-grants: {e}")))?;
            if mode == IdentityMode::Trust {
                tracing::warn!("--agent-identity-grants has no effect with --agent-identity-mode=trust");
            }
        }
        config.max_agent_ids_per_node = self.max_agent_ids_per_node;
        config.max_agent_ids_per_shared_identity = self.max_agent_ids_per_shared_identity;
        config.node_cache_ttl = self.agent_identity_node_cache_ttl;
        Ok(config)
    }
}
