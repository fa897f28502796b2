//! The flags of agent authentication by ServiceAccount token: the reference's rules for them, and the TokenReview
//! rate limit (ours).

use super::ServerFlags;
use crate::config::{DEFAULT_TOKEN_REVIEW_BURST, DEFAULT_TOKEN_REVIEW_QPS};
use clap::Args;
use konnectivity_process::flags::FlagError;

/// The TokenReviews' own rate limit (ours): the reference has only the Kubernetes client's
/// (`--kubeconfig-qps`/`--kubeconfig-burst`), which here only the Leases use.
#[derive(Debug, Clone, Args)]
pub struct TokenReviewFlags {
    /// TokenReviews per second, on average, for agent token authentication: a budget apart from
    /// --kubeconfig-qps, which then only the Leases use (ours).
    #[arg(long, default_value_t = DEFAULT_TOKEN_REVIEW_QPS)]
    pub token_review_qps: f32,
    /// TokenReviews at once after a quiet spell (ours). A review waits at most 5s for its turn; past that the
    /// agent is told to retry.
    #[arg(long, default_value_t = DEFAULT_TOKEN_REVIEW_BURST)]
    pub token_review_burst: u32,
}

impl TokenReviewFlags {
    fn check(&self) -> Result<(), FlagError> {
        if !(self.token_review_qps.is_finite() && self.token_review_qps > 0.0) {
            return Err(FlagError::invalid(format!(
                "--token-review-qps must be greater than 0, got {}",
                self.token_review_qps
            )));
        }
        if self.token_review_burst == 0 {
            return Err(FlagError::invalid("--token-review-burst must be greater than 0"));
        }
        Ok(())
    }
}

impl ServerFlags {
    /// Whether agents authenticate with ServiceAccount tokens (the flags that say so must all be set).
    pub(super) fn token_auth(&self) -> Result<bool, FlagError> {
        let token_auth = !self.agent_namespace.is_empty()
            || !self.agent_service_account.is_empty()
            || !self.authentication_audience.is_empty();
        if token_auth {
            if !self.cluster_ca_cert.is_empty() {
                return Err(FlagError::invalid(
                    "--cluster-ca-cert can not be used when agent authentication is enabled",
                ));
            }
            self.token_review.check()?;
            for (flag, value) in [
                ("agent-namespace", &self.agent_namespace),
                ("agent-service-account", &self.agent_service_account),
                ("authentication-audience", &self.authentication_audience),
            ] {
                if value.is_empty() {
                    return Err(FlagError::invalid(format!(
                        "--{flag} cannot be empty when agent authentication is enabled"
                    )));
                }
            }
        }
        Ok(token_auth)
    }
}
