//! Token reviews by token hash, so that a reconnect storm costs at most one TokenReview per distinct token and a
//! flood of bad tokens cannot take the review budget from the good ones:
//!
//! - **Coalescing.** At most one review of a token is in flight; streams presenting the same token meanwhile wait
//!   for its result instead of asking again. If the stream that leads the review leaves (its agent gave up), the
//!   review is dropped with it (and so is its rate-limit slot); one of the waiting streams then leads a new one.
//! - **Results kept.** A success for as long as the caller says (the TTL, bounded by the token's expiry); a
//!   refusal for [`NEGATIVE_TTL`], so that a stream flood repeating one bad token costs one review every few
//!   seconds, while a fixed ServiceAccount still takes effect within seconds. Failures to review (kube-apiserver
//!   unreachable, our own rate limit) are not kept.
//! - **A cap per source address** on the reviews it leads at once. The rate limiter serves reviews in order, so
//!   with at most `per_source` of one source's reviews queued, any other source's review waits behind at most
//!   that many of them, however many streams the first opens. Agents behind one NAT or proxy address share the
//!   cap; it does not cost them throughput (the limiter is the bottleneck, and `per_source` is at least its
//!   burst), only a retry for those past the cap, told when with the retry hint.
//!
//! The result type `V` is whatever the review yields (a user name, an identity); only `Clone` is asked of it.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// SHA-256 of a token: the cache never keeps a token itself.
pub(crate) type TokenHash = [u8; 32];

/// How long a refused token is refused without a new review.
pub(crate) const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// What a stream past its source's cap is told to wait before retrying.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// How a result was come by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// This call made the review.
    Reviewed,
    /// A kept result (success or refusal).
    Cached,
    /// Another stream's review of the same token, waited for.
    Joined,
    /// The source had too many reviews in flight: nothing was asked.
    Busy,
}

type Shared<V> = Option<Result<V, Status>>;

struct State<V> {
    /// Kept results and until when.
    done: HashMap<TokenHash, (Result<V, Status>, Instant)>,
    /// Reviews in flight; their result is published on the channel.
    in_flight: HashMap<TokenHash, watch::Receiver<Shared<V>>>,
    /// Reviews in flight per source address.
    by_source: HashMap<IpAddr, usize>,
}

/// The cache: see the module documentation.
pub(crate) struct ReviewCache<V> {
    state: Mutex<State<V>>,
    per_source: usize,
    max_kept: usize,
}

impl<V: Clone> ReviewCache<V> {
    /// A cache keeping at most `max_kept` results, letting each source lead at most `per_source` reviews at once.
    pub(crate) fn new(per_source: usize, max_kept: usize) -> Self {
        let state = State { done: HashMap::new(), in_flight: HashMap::new(), by_source: HashMap::new() };
        Self { state: Mutex::new(state), per_source: per_source.max(1), max_kept }
    }

    /// The result for the token hashed to `key`: kept, or being reviewed by another stream, or reviewed now
    /// with `review`. `keep` says how long a success may be kept (`None`: not at all).
    pub(crate) async fn get<F, Fut>(
        &self,
        key: TokenHash,
        source: Option<IpAddr>,
        review: F,
        keep: impl Fn(&V) -> Option<Duration>,
    ) -> (Result<V, Status>, Outcome)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, Status>>,
    {
        let mut review = Some(review);
        loop {
            let joined = match self.lookup(key, source) {
                Lookup::Done(result) => return (result, Outcome::Cached),
                Lookup::Busy => {
                    let message = "too many token reviews in flight from this address; retry later";
                    return (Err(unavailable_retry_after(message.into(), BUSY_RETRY)), Outcome::Busy);
                }
                Lookup::Join(rx) => rx,
                Lookup::Lead(tx) => {
                    let leading = Leading { cache: self, key, source, tx: Some(tx) };
                    let Some(review) = review.take() else {
                        // Unreachable: a call leads at most once, as leading ends the call.
                        return (Err(Status::internal("token review started twice")), Outcome::Reviewed);
                    };
                    let result = review().await;
                    let ttl = match &result {
                        Ok(v) => keep(v),
                        Err(status) if status.code() == Code::Unauthenticated => Some(NEGATIVE_TTL),
                        Err(_) => None,
                    };
                    leading.finish(result.clone(), ttl);
                    return (result, Outcome::Reviewed);
                }
            };
            let mut rx = joined;
            let published = rx.wait_for(Option::is_some).await.ok().and_then(|r| r.clone());
            if let Some(result) = published {
                return (result, Outcome::Joined);
            }
            // The leading stream left before its review ended: look again (and perhaps lead).
        }
    }

    fn lookup(&self, key: TokenHash, source: Option<IpAddr>) -> Lookup<V> {
        let mut state = self.state.lock();
        let now = Instant::now();
        match state.done.get(&key) {
            Some((result, until)) if *until > now => return Lookup::Done(result.clone()),
            Some(_) => {
                state.done.remove(&key);
            }
            None => {}
        }
        if let Some(rx) = state.in_flight.get(&key) {
            return Lookup::Join(rx.clone());
        }
        if let Some(ip) = source {
            let n = state.by_source.entry(ip).or_default();
            if *n >= self.per_source {
                return Lookup::Busy;
            }
            *n += 1;
        }
        let (tx, rx) = watch::channel(None);
        state.in_flight.insert(key, rx);
        Lookup::Lead(tx)
    }

    /// Results kept and reviews in flight (for tests).
    #[cfg(test)]
    fn sizes(&self) -> (usize, usize, usize) {
        let state = self.state.lock();
        (state.done.len(), state.in_flight.len(), state.by_source.values().sum())
    }
}

enum Lookup<V> {
    Done(Result<V, Status>),
    Join(watch::Receiver<Shared<V>>),
    Lead(watch::Sender<Shared<V>>),
    Busy,
}

/// Held by the stream leading a review: however it ends, the review leaves the in-flight table and its source's
/// count; finished, its result is published (and perhaps kept).
struct Leading<'a, V> {
    cache: &'a ReviewCache<V>,
    key: TokenHash,
    source: Option<IpAddr>,
    tx: Option<watch::Sender<Shared<V>>>,
}

impl<V: Clone> Leading<'_, V> {
    fn finish(mut self, result: Result<V, Status>, ttl: Option<Duration>) {
        let tx = self.tx.take();
        {
            let mut state = self.cache.state.lock();
            let now = Instant::now();
            if let Some(ttl) = ttl {
                if state.done.len() >= self.cache.max_kept {
                    state.done.retain(|_, (_, until)| *until > now);
                }
                if state.done.len() < self.cache.max_kept {
                    state.done.insert(self.key, (result.clone(), now + ttl));
                }
            }
            leave(&mut state, self.key, self.source);
        }
        if let Some(tx) = tx {
            tx.send_replace(Some(result));
        }
    }
}

fn leave<V>(state: &mut State<V>, key: TokenHash, source: Option<IpAddr>) {
    state.in_flight.remove(&key);
    if let Some(ip) = source
        && let Some(n) = state.by_source.get_mut(&ip)
    {
        *n = n.saturating_sub(1);
        if *n == 0 {
            state.by_source.remove(&ip);
        }
    }
}

impl<V> Drop for Leading<'_, V> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Left before the review ended: the waiting streams see the channel close and look again.
            leave(&mut self.cache.state.lock(), self.key, self.source);
        }
    }
}

/// `Unavailable` with `message`, and the gRPC retry pushback (in milliseconds) that our agents honour as the
/// delay before their next attempt.
pub(crate) fn unavailable_retry_after(message: String, after: Duration) -> Status {
    let mut md = MetadataMap::new();
    md.insert(konnectivity_proto::names::RETRY_PUSHBACK_MS, MetadataValue::from(after.as_millis() as u64));
    Status::with_metadata(Code::Unavailable, message, md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const IP: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[tokio::test]
    async fn concurrent_reviews_of_one_token_are_one() {
        let tracker = tokio_util::task::TaskTracker::new();
        let cache = Arc::new(ReviewCache::<String>::new(100, 100));
        let reviews = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut waiting = Vec::new();
        for _ in 0..10 {
            let (cache, reviews, gate) = (cache.clone(), reviews.clone(), gate.clone());
            waiting.push(tracker.spawn(async move {
                let review = || async {
                    reviews.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok("alice".to_string())
                };
                cache.get([1; 32], IP, review, |_| None).await
            }));
        }
        while cache.sizes().1 == 0 || reviews.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.notify_waiters();
        let mut outcomes = Vec::new();
        for w in waiting {
            let (result, outcome) = w.await.expect("task");
            assert_eq!(result.expect("accepted"), "alice");
            outcomes.push(outcome);
        }
        assert_eq!(reviews.load(Ordering::SeqCst), 1, "one review for ten streams");
        assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Reviewed).count(), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == Outcome::Joined).count(), 9);
        assert_eq!(cache.sizes(), (0, 0, 0), "nothing kept (keep said no), nothing left in flight");
    }

    #[tokio::test]
    async fn a_leader_who_leaves_hands_the_review_to_a_waiter() {
        let tracker = tokio_util::task::TaskTracker::new();
        let cache = Arc::new(ReviewCache::<String>::new(100, 100));
        let never = || std::future::pending::<Result<String, Status>>();
        let leader = tracker.spawn({
            let cache = cache.clone();
            async move { cache.get([2; 32], IP, never, |_| None).await }
        });
        while cache.sizes().1 == 0 {
            tokio::task::yield_now().await;
        }
        let follower = tracker.spawn({
            let cache = cache.clone();
            async move {
                let ok = || async { Ok::<_, Status>("bob".to_string()) };
                cache.get([2; 32], IP, ok, |_| Some(Duration::from_secs(60))).await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let (result, outcome) = follower.await.expect("follower");
        assert_eq!((result.expect("accepted").as_str(), outcome), ("bob", Outcome::Reviewed));
        assert_eq!(cache.sizes(), (1, 0, 0), "the success is kept; nothing in flight");
        let (again, outcome) = cache.get([2; 32], IP, never, |_| None).await;
        assert_eq!((again.expect("kept").as_str(), outcome), ("bob", Outcome::Cached));
    }

    #[tokio::test]
    async fn refusals_are_kept_briefly_failures_not_at_all() {
        let cache = ReviewCache::<String>::new(100, 100);
        let denied = || async { Err::<String, _>(Status::unauthenticated("no")) };
        let (r, o) = cache.get([3; 32], IP, denied, |_| None).await;
        assert_eq!((r.expect_err("denied").code(), o), (Code::Unauthenticated, Outcome::Reviewed));
        let (r, o) = cache.get([3; 32], IP, denied, |_| None).await;
        assert_eq!((r.expect_err("denied").code(), o), (Code::Unauthenticated, Outcome::Cached));
        let failed = || async { Err::<String, _>(Status::unavailable("kube-apiserver down")) };
        let (_, o) = cache.get([4; 32], IP, failed, |_| None).await;
        assert_eq!(o, Outcome::Reviewed);
        let (_, o) = cache.get([4; 32], IP, failed, |_| None).await;
        assert_eq!(o, Outcome::Reviewed, "a failure to review is asked again");
    }

    #[tokio::test]
    async fn a_source_leads_at_most_its_share_of_reviews() {
        let tracker = tokio_util::task::TaskTracker::new();
        let cache = Arc::new(ReviewCache::<String>::new(2, 100));
        let never = || std::future::pending::<Result<String, Status>>();
        let held: Vec<_> = (0..2u8)
            .map(|i| {
                let cache = cache.clone();
                tracker.spawn(async move { cache.get([10 + i; 32], IP, never, |_| None).await })
            })
            .collect();
        while cache.sizes().2 < 2 {
            tokio::task::yield_now().await;
        }
        let (r, o) = cache.get([20; 32], IP, never, |_| None).await;
        let status = r.expect_err("busy");
        assert_eq!((status.code(), o), (Code::Unavailable, Outcome::Busy));
        assert_eq!(
            status.metadata().get(konnectivity_proto::names::RETRY_PUSHBACK_MS).map(|v| v.to_str().ok()),
            Some(Some("1000"))
        );
        let other: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
        let ok = || async { Ok::<_, Status>("carol".to_string()) };
        let (r, _) = cache.get([21; 32], other, ok, |_| None).await;
        assert!(r.is_ok(), "another source is not capped");
        for h in held {
            h.abort();
            let _ = h.await;
        }
        assert_eq!(cache.sizes(), (0, 0, 0), "streams that left release their source's share");
    }
}
