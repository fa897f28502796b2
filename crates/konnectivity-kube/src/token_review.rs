//! `authentication.k8s.io/v1` TokenReview.

use crate::{Client, KubeError};
use http::Method;
use serde::Deserialize;
use std::collections::BTreeMap;

/// What the API server says about a token.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct TokenReviewStatus {
    /// Whether the token is valid for one of the requested audiences.
    pub authenticated: bool,
    /// Who it belongs to.
    pub user: UserInfo,
    /// The audiences it is valid for (of those requested).
    pub audiences: Vec<String>,
    /// An error the authenticator reported.
    pub error: String,
}

/// The authenticated user.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct UserInfo {
    /// `system:serviceaccount:<namespace>:<name>` for service accounts.
    pub username: String,
    /// UID.
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
    /// What the authenticator adds about the user: for a bound ServiceAccount token, the pod and node it is
    /// bound to ([`NODE_NAME_EXTRA`]).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The `extra` key under which kube-apiserver names the node a ServiceAccount token is bound to (tokens
/// projected into a pod carry it since Kubernetes 1.30, `ServiceAccountTokenPodNodeInfo`).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

impl UserInfo {
    /// The node the token is bound to, if the review says so (exactly one non-empty value).
    pub fn node_name(&self) -> Option<&str> {
        match self.extra.get(NODE_NAME_EXTRA).map(Vec::as_slice) {
            Some([node]) if !node.is_empty() => Some(node),
            _ => None,
        }
    }
}

impl Client {
    /// Creates a TokenReview for `token` with the given audiences and returns its status.
    pub async fn token_review(&self, token: &str, audiences: &[String]) -> Result<TokenReviewStatus, KubeError> {
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        });
        let resp = self.call(Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews", Some(&body)).await?;
        #[derive(Deserialize)]
        struct Review {
            #[serde(default)]
            status: TokenReviewStatus,
        }
        let review: Review = serde_json::from_slice(&resp)
            .map_err(|e| KubeError::Decode { what: "TokenReview", cause: e.to_string() })?;
        Ok(review.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_node_is_read_from_extra() {
        let status: TokenReviewStatus = serde_json::from_value(serde_json::json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:kube-system:konnectivity-agent",
                     "extra": {NODE_NAME_EXTRA: ["node-a"], "authentication.kubernetes.io/pod-name": ["agent-x"]}},
        }))
        .expect("status");
        assert_eq!(status.user.node_name(), Some("node-a"));
        let none: UserInfo = serde_json::from_value(serde_json::json!({"username": "u"})).expect("user");
        assert_eq!(none.node_name(), None);
        let two: UserInfo =
            serde_json::from_value(serde_json::json!({"extra": {NODE_NAME_EXTRA: ["a", "b"]}})).expect("user");
        assert_eq!(two.node_name(), None, "two nodes name none");
    }
}
