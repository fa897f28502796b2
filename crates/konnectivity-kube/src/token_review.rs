//! `authentication.k8s.io/v1` TokenReview.

use crate::{Client, KubeError};
use http::Method;
use serde::Deserialize;

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
