//! Agent authentication by ServiceAccount token (`--agent-namespace`, `--agent-service-account`,
//! `--authentication-audience`), checked with a TokenReview exactly as the reference checks it, plus a short
//! cache of successful reviews so that a reconnect storm does not become a TokenReview storm (ANP#237).

use crate::config::AgentAuthConfig;
use crate::identity::AgentIdentity;
use base64::Engine;
use konnectivity_kube::Client;
use parking_lot::Mutex;
use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::Status;
use tonic::metadata::MetadataMap;

/// The metadata key agents send their token in, and the scheme prefix it must have.
pub(crate) const AUTHORIZATION: &str = "authorization";
const BEARER: &str = "Bearer ";

/// Reviews cached at most; past this only entries that expired are evicted, and new ones are not cached.
const MAX_CACHED: usize = 10_000;

/// Checks agent tokens.
pub(crate) struct TokenAuthenticator {
    client: Client,
    config: AgentAuthConfig,
    expected_username: String,
    /// sha256(token) → (who it is, cached until).
    cache: Mutex<HashMap<[u8; 32], (AgentIdentity, Instant)>>,
    results: IntCounterVec,
}

impl TokenAuthenticator {
    pub(crate) fn new(client: Client, config: AgentAuthConfig, results: IntCounterVec) -> Self {
        let expected_username = format!("system:serviceaccount:{}:{}", config.namespace, config.service_account);
        Self { client, config, expected_username, cache: Mutex::new(HashMap::new()), results }
    }

    fn count(&self, result: &str) {
        self.results.with_label_values(&[result]).inc();
    }

    /// Authenticates the agent stream whose metadata is `md`. Returns who the token says it is: the service
    /// account's user name, and the node a bound token names.
    pub(crate) async fn authenticate(&self, md: &MetadataMap) -> Result<AgentIdentity, Status> {
        let values: Vec<_> = md.get_all(AUTHORIZATION).iter().collect();
        let value = match values.as_slice() {
            [] => {
                self.count("denied");
                return Err(Status::unauthenticated("Authentication context was not found in metadata"));
            }
            [v] => v.to_str().unwrap_or(""),
            more => {
                self.count("denied");
                return Err(Status::unauthenticated(format!("too many ({}) tokens are received", more.len())));
            }
        };
        let Some(token) = value.strip_prefix(BEARER) else {
            self.count("denied");
            return Err(Status::unauthenticated(format!("received token does not have {BEARER:?} prefix")));
        };
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((user, until)) = self.cache.lock().get(&key)
            && *until > now
        {
            self.count("cached");
            return Ok(user.clone());
        }
        match self.review(token).await {
            Ok(user) => {
                self.count("ok");
                if let Some(ttl) = cache_ttl(token, self.config.cache_ttl) {
                    let mut cache = self.cache.lock();
                    if cache.len() >= MAX_CACHED {
                        cache.retain(|_, (_, until)| *until > now);
                    }
                    if cache.len() < MAX_CACHED {
                        cache.insert(key, (user.clone(), now + ttl));
                    }
                }
                Ok(user)
            }
            Err(status) => {
                self.count(if status.code() == tonic::Code::Unauthenticated { "denied" } else { "error" });
                Err(status)
            }
        }
    }

    /// One TokenReview, with the reference's checks and wording.
    async fn review(&self, token: &str) -> Result<AgentIdentity, Status> {
        let fail = |m: String| Status::unauthenticated(format!("Failed to validate authentication token, err:{m}"));
        let status =
            self.client.token_review(token, std::slice::from_ref(&self.config.audience)).await.map_err(|e| {
                Status::unavailable(format!(
                    "Failed to validate authentication token, err:Failed to authenticate request. err:{e}"
                ))
            })?;
        if !status.error.is_empty() {
            return Err(fail(format!("lookup failed: {}", status.error)));
        }
        if !status.authenticated {
            return Err(fail("lookup failed: service account jwt not valid".into()));
        }
        let username = &status.user.username;
        let parts: Vec<&str> = username.split(':').collect();
        if parts.len() != 4 {
            return Err(fail("lookup failed: unexpected username format".into()));
        }
        if parts[0] != "system" || parts[1] != "serviceaccount" {
            return Err(fail("lookup failed: username returned is not a service account".into()));
        }
        if parts[2] != self.config.namespace {
            return Err(fail(format!(
                "lookup failed: incoming request from {:?} namespace. Expected {:?}",
                parts[2], self.config.namespace
            )));
        }
        if parts[3] != self.config.service_account {
            return Err(fail(format!(
                "lookup failed: incoming request from {:?} service account. Expected {:?}",
                parts[3], self.config.service_account
            )));
        }
        debug_assert_eq!(*username, self.expected_username);
        Ok(AgentIdentity::of_token(username, status.user.node_name()))
    }
}

/// How long a successful review of `token` may be reused: `max`, but never past the token's own `exp`
/// (read from the JWT payload, which the TokenReview has just vouched for). `None`: do not cache.
fn cache_ttl(token: &str, max: Duration) -> Option<Duration> {
    if max.is_zero() {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    let left = Duration::from_secs(exp.checked_sub(now)?);
    Some(left.min(max)).filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let enc = |v: serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.sig", enc(serde_json::json!({"alg": "ES256"})), enc(serde_json::json!({"exp": exp})))
    }

    #[test]
    fn cache_is_bounded_by_the_token_expiry() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let max = Duration::from_secs(60);
        assert_eq!(cache_ttl(&jwt(now + 3600), max), Some(max));
        let short = cache_ttl(&jwt(now + 10), max).expect("cached");
        assert!(short <= Duration::from_secs(10) && short >= Duration::from_secs(8), "{short:?}");
        assert_eq!(cache_ttl(&jwt(now.saturating_sub(5)), max), None, "expired token: never cached");
        assert_eq!(cache_ttl("not-a-jwt", max), None);
        assert_eq!(cache_ttl(&jwt(now + 3600), Duration::ZERO), None, "cache disabled");
    }
}
