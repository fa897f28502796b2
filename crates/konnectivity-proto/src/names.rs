//! Every name a Go peer sees, spelled as the reference spells it. Keep them here, in one place, so a typo
//! cannot hide in a call site.

/// Request metadata: the agent's ID (exactly one value).
pub const AGENT_ID: &str = "agentid";
/// Request metadata: the agent's identifiers, URL-query encoded (at most one value).
pub const AGENT_IDENTIFIERS: &str = "agentidentifiers";
/// Request metadata: `Bearer <token>` for ServiceAccount token auth.
pub const AUTHORIZATION: &str = "authorization";
/// Response header: the server's ID.
pub const SERVER_ID: &str = "serverid";
/// Response header: how many servers the agent should connect to, in decimal.
pub const SERVER_COUNT: &str = "servercount";
/// Request metadata (konnectivity-rs agents only; Go servers ignore it): the fingerprint of the egress policy the
/// agent enforces after resolving names. A server with a policy gives names only to agents that enforce it.
pub const EGRESS_POLICY: &str = "konnectivity-rs-egress-policy";
/// Response metadata of an `Unavailable` status: how many milliseconds to wait before trying again (gRPC's own
/// retry pushback key). Our server sends it when it is too busy to review an agent's token now; our agents
/// honour it. Go agents ignore it and retry with their own backoff.
pub const RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// gRPC path of the frontend service.
pub const PROXY_PATH: &str = "/ProxyService/Proxy";
/// gRPC path of the agent service.
pub const CONNECT_PATH: &str = "/AgentService/Connect";

/// Error text of a dial the server could route to no agent (the reference's wording; clients match on it).
pub const NO_AGENT_AVAILABLE: &str = "No agent available";
/// CLOSE_RSP error for a frontend that sends DATA before dialing.
pub const BACKEND_NOT_INITIALIZED: &str = "backend not initialized";
/// CLOSE_RSP error for a frontend that sends CLOSE_REQ before dialing.
pub const BACKEND_UNINITIALIZED: &str = "backend uninitialized";
/// CLOSE_RSP error when a frontend stream uses two connection IDs.
pub const MISMATCHED_CONNECTION_IDS: &str = "mismatched connection IDs";
/// The agent's CLOSE_RSP error for DATA on a connection it does not know.
pub const UNRECOGNIZED_CONNECT_ID: &str = "unrecognized connectID";
/// The agent's CLOSE_RSP error for CLOSE_REQ on a connection it does not know.
pub const UNKNOWN_CONNECT_ID: &str = "Unknown connectID";
/// DIAL_RSP error when the backend did not answer within `--backend-dial-timeout`.
pub const BACKEND_DIAL_TIMEOUT: &str = "timed out waiting for backend dial";

/// Agent identifier keys accepted in `agentidentifiers` / `--agent-identifiers`.
pub const IDENTIFIER_KEYS: [&str; 5] = ["host", "ipv4", "ipv6", "cidr", "default-route"];

/// Prefix of every Prometheus metric: `<namespace>_<subsystem>_<name>`.
pub const METRICS_NAMESPACE: &str = "konnectivity_network_proxy";

/// A gRPC status code's name as grpc-go prints it (`Canceled`, `Unavailable`, …), for the `code` metric label.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_the_generated_services() {
        let generated = include_str!("gen/konnectivity.rs");
        assert!(generated.contains(&format!("\"{PROXY_PATH}\"")));
        assert!(generated.contains(&format!("\"{CONNECT_PATH}\"")));
    }

    #[test]
    fn metadata_keys_are_lowercase_ascii() {
        // gRPC lowercases keys on the wire; tonic panics on uppercase ones.
        for key in [AGENT_ID, AGENT_IDENTIFIERS, AUTHORIZATION, SERVER_ID, SERVER_COUNT] {
            assert!(key.bytes().all(|b| b.is_ascii_lowercase()), "{key}");
        }
    }
}
