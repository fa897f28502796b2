//! Agent authentication by ServiceAccount token (`--agent-namespace`, `--agent-service-account`,
//! `--authentication-audience`), checked with a TokenReview exactly as the reference checks it, plus what keeps a
//! reconnect storm from becoming a TokenReview storm (ANP#237) and a flood of bad tokens from starving good ones:
//! reviews have a rate limit of their own (`--token-review-qps`/`--token-review-burst`) with a bounded wait,
//! concurrent reviews of one token are one, results are kept ([`crate::review_cache`]), and tokens that are not
//! even shaped like a JWT are refused without a review.

use crate::config::AgentAuthConfig;
use crate::identity::AgentIdentity;
use crate::review_cache::{Outcome, ReviewCache, unavailable_retry_after};
use base64::Engine;
use konnectivity_kube::{Client, KubeError, RequestLimits};
use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Status;
use tonic::metadata::MetadataMap;

/// The metadata key agents send their token in, and the scheme prefix it must have.
pub(crate) const AUTHORIZATION: &str = "authorization";
const BEARER: &str = "Bearer ";

/// Reviews cached at most; past this only entries that expired are evicted, and new ones are not cached.
const MAX_CACHED: usize = 10_000;

/// The longest a review waits for a slot of the review rate limit. Past it the stream is refused at once with
/// `Unavailable` and a retry hint, instead of being promised a slot so far away that its agent has given up
/// (and retried, asking again) by then.
const REVIEW_MAX_WAIT: Duration = Duration::from_secs(5);

/// The deadline of one review from the moment it is asked: the wait for a rate-limit slot (at most
/// [`REVIEW_MAX_WAIT`]), connecting to kube-apiserver, and its answer. Past it the review failed (`error`).
const REVIEW_DEADLINE: Duration = Duration::from_secs(9);

/// The longest a stream waits for its token to be reviewed: its own review's [`REVIEW_DEADLINE`] and a moment, or
/// another stream's review of the same token (and then, if that stream left, its own). Past it the stream is told
/// to retry. Agents must wait longer than this for the response headers: ours wait 15 s.
pub const TOKEN_REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Reviews one source address may lead at once, at least (the review burst, if larger): see
/// [`crate::review_cache`] for why a cap per source bounds what a flood from one address costs others.
const MIN_REVIEWS_PER_SOURCE: u32 = 8;

/// Checks agent tokens.
pub(crate) struct TokenAuthenticator {
    client: Client,
    config: AgentAuthConfig,
    expected_username: String,
    /// sha256(token) → results kept, and reviews in flight.
    reviews: ReviewCache<AgentIdentity>,
    results: IntCounterVec,
}

impl TokenAuthenticator {
    /// Reviews go through `client`'s connections, with a rate limit of their own (`config`'s), apart from the
    /// Leases'.
    pub(crate) fn new(client: Client, config: AgentAuthConfig, results: IntCounterVec) -> Self {
        let expected_username = format!("system:serviceaccount:{}:{}", config.namespace, config.service_account);
        let client = client.with_limits(RequestLimits {
            qps: config.review_qps,
            burst: config.review_burst,
            max_wait: REVIEW_MAX_WAIT,
            timeout: REVIEW_DEADLINE,
        });
        let per_source = config.review_burst.max(MIN_REVIEWS_PER_SOURCE) as usize;
        Self { client, config, expected_username, reviews: ReviewCache::new(per_source, MAX_CACHED), results }
    }

    fn count(&self, result: &str) {
        self.results.with_label_values(&[result]).inc();
    }

    /// Authenticates the agent stream whose metadata is `md`, from `source`. Returns who the token says it is:
    /// the service account's user name, and the node a bound token names.
    pub(crate) async fn authenticate(&self, md: &MetadataMap, source: Option<IpAddr>) -> Result<AgentIdentity, Status> {
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
        if !is_jwt_shaped(token) {
            self.count("denied");
            return Err(Status::unauthenticated(
                "Failed to validate authentication token, err:lookup failed: the token is not a JWT",
            ));
        }
        let key = Sha256::digest(token.as_bytes()).into();
        let keep = |_: &AgentIdentity| cache_ttl(token, self.config.cache_ttl);
        // The review's own deadline bounds a stream that leads it; this bounds one that waited for another's
        // review and then, that stream having left, led a new one.
        let reviewed = self.reviews.get(key, source, || self.review(token), keep);
        let (result, outcome) = tokio::time::timeout(TOKEN_REVIEW_TIMEOUT, reviewed).await.unwrap_or_else(|_| {
            let message =
                format!("Failed to validate authentication token, err:no review within {TOKEN_REVIEW_TIMEOUT:?}");
            (Err(unavailable_retry_after(message, Duration::from_secs(1))), Outcome::Busy)
        });
        self.count(match (&result, outcome) {
            (Ok(_), Outcome::Reviewed) => "ok",
            (Ok(_), _) => "cached",
            (Err(status), _) if status.code() == tonic::Code::Unauthenticated => "denied",
            (Err(status), _) if status.metadata().contains_key(konnectivity_proto::names::RETRY_PUSHBACK_MS) => {
                "throttled"
            }
            (Err(_), _) => "error",
        });
        result
    }

    /// One TokenReview, with the reference's checks and wording.
    async fn review(&self, token: &str) -> Result<AgentIdentity, Status> {
        let fail = |m: String| Status::unauthenticated(format!("Failed to validate authentication token, err:{m}"));
        let status =
            self.client.token_review(token, std::slice::from_ref(&self.config.audience)).await.map_err(|e| {
                let message =
                    format!("Failed to validate authentication token, err:Failed to authenticate request. err:{e}");
                match e {
                    KubeError::Throttled { retry_after, .. } => {
                        unavailable_retry_after(message, retry_after.max(Duration::from_secs(1)))
                    }
                    _ => Status::unavailable(message),
                }
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

/// Whether `token` is shaped like a JWT, as every ServiceAccount token is: three base64url parts, the first two
/// JSON objects, the header naming its `alg`. Nothing else can pass a TokenReview as a ServiceAccount, so
/// anything else is refused without one (the reference asks kube-apiserver all the same): a flood of garbage
/// costs no review budget. Nothing here is trusted: the signature and claims are the review's to check.
fn is_jwt_shaped(token: &str) -> bool {
    let json_object = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .filter(serde_json::Value::is_object)
    };
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !signature.is_empty()
        && json_object(header).is_some_and(|h| h.get("alg").is_some_and(serde_json::Value::is_string))
        && json_object(payload).is_some()
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

    #[test]
    fn only_jwt_shaped_tokens_are_reviewed() {
        assert!(is_jwt_shaped(&jwt(1)));
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for bad in [
            String::new(),
            "header.payload.signature".into(),
            "a.b".into(),
            format!("{}.{}.sig.extra", enc(r#"{"alg":"RS256"}"#), enc("{}")),
            format!("{}.{}.", enc(r#"{"alg":"RS256"}"#), enc("{}")),
            format!("{}.{}.sig", enc(r#"{"typ":"JWT"}"#), enc("{}")),
            format!("{}.{}.sig", enc(r#"{"alg":"RS256"}"#), enc("[1]")),
            format!("{}.{}.sig", enc(r#"{"alg":"RS256"}"#), "!!!"),
        ] {
            assert!(!is_jwt_shaped(&bad), "{bad:?}");
        }
    }

    /// A review past the bounded wait of the review rate limit is refused at once, `Unavailable` with a retry
    /// hint, and counted as throttled; a review that could not be made is an error.
    #[tokio::test]
    async fn a_review_past_the_rate_limit_s_bound_is_told_when_to_retry() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertificateParams::new(vec!["ca".to_string()]).expect("params").self_signed(&key).expect("ca");
        let ca = base64::engine::general_purpose::STANDARD.encode(ca.pem());
        let path = std::env::temp_dir().join(format!("auth-test-{}-{}.kubeconfig", std::process::id(), addr.port()));
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{addr}\n    \
             certificate-authority-data: {ca}\ncontexts:\n- name: c\n  context:\n    cluster: c\ncurrent-context: c\n"
        );
        std::fs::write(&path, kubeconfig).expect("kubeconfig");
        let config = konnectivity_kube::Config::load(Some(&path));
        let _ = std::fs::remove_file(&path);
        let client = Client::new(config.expect("config"), 0.0, 0).expect("client");
        let mut auth_config = AgentAuthConfig::new("kube-system", "konnectivity-agent", "konnectivity");
        (auth_config.review_qps, auth_config.review_burst) = (0.01, 1);
        let results =
            IntCounterVec::new(prometheus::Opts::new("authentications", "test"), &["result"]).expect("counter");
        let auth = TokenAuthenticator::new(client, auth_config, results.clone());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let md = |exp| {
            let mut md = MetadataMap::new();
            md.insert(AUTHORIZATION, format!("Bearer {}", jwt(exp)).parse().expect("value"));
            md
        };
        let source = Some(IpAddr::from([127, 0, 0, 1]));
        let failed = auth.authenticate(&md(now + 3600), source).await.expect_err("nothing listens");
        assert_eq!(failed.code(), tonic::Code::Unavailable);
        assert!(failed.metadata().get(konnectivity_proto::names::RETRY_PUSHBACK_MS).is_none(), "{failed:?}");
        // The burst is spent; the next slot is 100 s away, past the 5 s a review may wait.
        let throttled = auth.authenticate(&md(now + 3601), source).await.expect_err("throttled");
        assert_eq!(throttled.code(), tonic::Code::Unavailable);
        assert!(throttled.message().contains("client-side rate limit: no request slot within 5s"), "{throttled:?}");
        let hint = throttled.metadata().get(konnectivity_proto::names::RETRY_PUSHBACK_MS).expect("hint");
        let hint: u64 = hint.to_str().expect("text").parse().expect("milliseconds");
        assert!((90_000..=95_000).contains(&hint), "{hint}");
        let count = |r: &str| results.with_label_values(&[r]).get();
        assert_eq!((count("error"), count("throttled")), (1, 1));
    }
}
