//! LIST + WATCH of Leases, as client-go's reflector does it: one LIST for a consistent snapshot and its
//! resourceVersion, then one long WATCH from there (with bookmarks, so a reconnect resumes where it left off);
//! a fresh LIST only when the API server says the version is too old (410 Gone) or the watch cannot be resumed.
//! Failures back off exponentially with full jitter, so a kube-apiserver restart does not meet every agent at
//! once.
//!
//! [`LeaseReflector`] owns the cache: it alone changes it, and readers get immutable snapshots through a
//! `tokio::sync::watch` channel.

use crate::lease::Lease;
use crate::{Client, KubeError};
use bytes::{Buf, BytesMut};
use http::Method;
use http_body_util::BodyExt;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest event line accepted from a watch (a Lease is well under 1 KiB; a line this long is a broken or
/// hostile server, and the watch is restarted rather than buffering without bound).
const MAX_EVENT_LINE: usize = 1 << 20;
/// Backoff after a failed LIST or WATCH: doubling from the first to the cap, each wait drawn uniformly from
/// zero to the current bound (full jitter).
const BACKOFF_FIRST: Duration = Duration::from_millis(800);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How long one WATCH request asks the server to keep the stream open: client-go draws from 5 to 10 minutes so
/// that reconnects spread out; the same here.
const WATCH_MIN: Duration = Duration::from_secs(300);

/// A snapshot of the Leases matching the selector, by name.
pub type LeaseSnapshot = Arc<BTreeMap<String, Lease>>;

/// What the reflector did, for metrics and logs: every API call it made and how it ended.
#[derive(Debug)]
pub enum Observation {
    /// A LIST returned `status` after `latency` (200 on success).
    Listed {
        /// HTTP status.
        status: u16,
        /// Time the call took.
        latency: Duration,
    },
    /// A WATCH was opened (`status` 200) or refused.
    Watched {
        /// HTTP status.
        status: u16,
    },
    /// A call failed before any status: the API server could not be reached, or the answer was unreadable.
    Failed(KubeError),
    /// A watch stream ended (server timeout, connection loss, or an ERROR event); `gone` when it said 410.
    WatchEnded {
        /// The server reported the resourceVersion as too old: the next step is a fresh LIST.
        gone: bool,
        /// Why, in words.
        reason: String,
    },
}

/// Keeps a cache of the Leases in a namespace that match a label selector.
pub struct LeaseReflector {
    client: Client,
    namespace: String,
    selector: String,
    snapshot: tokio::sync::watch::Sender<LeaseSnapshot>,
}

#[derive(Deserialize)]
struct ListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: String,
}

#[derive(Deserialize)]
struct LeaseList {
    #[serde(default)]
    metadata: Option<ListMeta>,
    #[serde(default)]
    items: Vec<Lease>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: serde_json::Value,
}

/// How a watch stream ended.
enum WatchEnd {
    /// Resume from the last resourceVersion seen.
    Resume(String),
    /// Start again with a LIST.
    Relist,
}

impl LeaseReflector {
    /// A reflector for `namespace` and `selector` (`k=v,k2=v2`; empty for all), and the receiving end of its
    /// snapshots (empty until the first LIST succeeds).
    pub fn new(client: Client, namespace: &str, selector: &str) -> (Self, tokio::sync::watch::Receiver<LeaseSnapshot>) {
        let (snapshot, rx) = tokio::sync::watch::channel(LeaseSnapshot::default());
        (Self { client, namespace: namespace.to_string(), selector: selector.to_string(), snapshot }, rx)
    }

    /// Lists and watches until `stop` completes, reporting every call to `observe`.
    pub async fn run(self, mut observe: impl FnMut(Observation) + Send, stop: impl Future<Output = ()> + Send) {
        tokio::select! {
            _ = stop => {}
            _ = self.reflect(&mut observe) => {}
        }
    }

    async fn reflect(&self, observe: &mut (impl FnMut(Observation) + Send)) {
        let mut backoff = Backoff::default();
        let mut version: Option<String> = None;
        loop {
            let rv = match version.take() {
                Some(rv) => rv,
                None => match self.list(observe).await {
                    Some(rv) => rv,
                    None => {
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                },
            };
            let opened = Instant::now();
            let ended = self.watch(&rv, observe).await;
            // A watch that ran for a while was healthy: the backoff starts over. Only that resets it (not a good
            // LIST), so a server that ends every watch at once gets ever slower LISTs and WATCHes, not a loop.
            let healthy = opened.elapsed() > Duration::from_secs(10);
            if healthy {
                backoff.reset();
            }
            match ended {
                // Its end (usually the server's timeout) is no reason to wait.
                Ok(WatchEnd::Resume(last)) if healthy => version = Some(last),
                Ok(WatchEnd::Resume(last)) => {
                    tokio::time::sleep(backoff.next()).await;
                    version = Some(last);
                }
                Ok(WatchEnd::Relist) | Err(()) => tokio::time::sleep(backoff.next()).await,
            }
        }
    }

    fn path(&self) -> String {
        let mut path = Client::leases_path(&self.namespace);
        path.push('?');
        if !self.selector.is_empty() {
            path.push_str("labelSelector=");
            path.push_str(&crate::lease::escape(&self.selector));
            path.push('&');
        }
        path
    }

    /// One LIST: replaces the cache and returns its resourceVersion, or `None` after reporting the failure.
    async fn list(&self, observe: &mut (impl FnMut(Observation) + Send)) -> Option<String> {
        let started = Instant::now();
        let path = self.path();
        let resp = match self.client.request(Method::GET, path.trim_end_matches(['?', '&']), None).await {
            Ok(r) => r,
            Err(e) => {
                observe(Observation::Failed(e));
                return None;
            }
        };
        observe(Observation::Listed { status: resp.status, latency: started.elapsed() });
        if resp.status != 200 {
            return None;
        }
        let list: LeaseList = match serde_json::from_slice(&resp.body) {
            Ok(l) => l,
            Err(e) => {
                observe(Observation::Failed(KubeError::Decode { what: "LeaseList", cause: e.to_string() }));
                return None;
            }
        };
        let items = list.items.into_iter().map(|l| (l.metadata.name.clone(), l)).collect();
        self.snapshot.send_replace(Arc::new(items));
        Some(list.metadata.map(|m| m.resource_version).unwrap_or_default())
    }

    /// One WATCH from `rv`, applying events to the cache until the stream ends. `Err` when it could not be
    /// opened or read (already reported).
    async fn watch(&self, rv: &str, observe: &mut (impl FnMut(Observation) + Send)) -> Result<WatchEnd, ()> {
        let timeout = WATCH_MIN + WATCH_MIN.mul_f64(rand::random::<f64>());
        let path = format!(
            "{}watch=1&allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={}",
            self.path(),
            crate::lease::escape(rv),
            timeout.as_secs()
        );
        let (status, mut body) = match self.client.open_stream(&path).await {
            Ok(r) => r,
            Err(e) => {
                observe(Observation::Failed(e));
                return Err(());
            }
        };
        observe(Observation::Watched { status });
        match status {
            200 => {}
            410 => {
                observe(Observation::WatchEnded {
                    gone: true,
                    reason: "the resourceVersion is too old (410 Gone)".into(),
                });
                return Ok(WatchEnd::Relist);
            }
            _ => return Err(()),
        }
        let mut last = rv.to_string();
        let mut buf = BytesMut::new();
        // The server ends the stream at `timeoutSeconds`; this bound only catches a server that never does.
        let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(60);
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => {
                    let reason = format!("watch stream broke: {e}");
                    observe(Observation::WatchEnded { gone: false, reason });
                    return Ok(WatchEnd::Resume(last));
                }
                Ok(None) | Err(_) => {
                    observe(Observation::WatchEnded { gone: false, reason: "watch stream ended".into() });
                    return Ok(WatchEnd::Resume(last));
                }
            };
            let Ok(data) = frame.into_data() else { continue };
            // Only the new bytes are searched for the end of a line: what was searched before holds none.
            let mut searched = buf.len();
            buf.extend_from_slice(&data);
            while let Some(at) = buf[searched..].iter().position(|b| *b == b'\n') {
                let line = buf.split_to(searched + at + 1);
                searched = 0;
                if let Some(end) = apply(&self.snapshot, &line[..line.len() - 1], &mut last, observe) {
                    return Ok(end);
                }
            }
            if buf.len() > MAX_EVENT_LINE {
                let reason = format!("a watch event longer than {MAX_EVENT_LINE} bytes");
                observe(Observation::WatchEnded { gone: false, reason });
                buf.advance(buf.len());
                return Ok(WatchEnd::Relist);
            }
        }
    }
}

/// Applies one watch event line to the cache; `Some` when the stream must end.
fn apply(
    cache: &tokio::sync::watch::Sender<LeaseSnapshot>,
    line: &[u8],
    last: &mut String,
    observe: &mut (impl FnMut(Observation) + Send),
) -> Option<WatchEnd> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let event: Event = match serde_json::from_slice(line) {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("an unreadable watch event: {e}");
            observe(Observation::WatchEnded { gone: false, reason });
            return Some(WatchEnd::Relist);
        }
    };
    let version = event.object["metadata"]["resourceVersion"].as_str().map(str::to_string);
    match event.kind.as_str() {
        "ADDED" | "MODIFIED" | "DELETED" => {
            let lease: Lease = match serde_json::from_value(event.object) {
                Ok(l) => l,
                Err(e) => {
                    let reason = format!("an unreadable Lease in a watch event: {e}");
                    observe(Observation::WatchEnded { gone: false, reason });
                    return Some(WatchEnd::Relist);
                }
            };
            let deleted = event.kind == "DELETED";
            cache.send_modify(|snapshot| {
                let map = Arc::make_mut(snapshot);
                if deleted {
                    map.remove(&lease.metadata.name);
                } else {
                    map.insert(lease.metadata.name.clone(), lease);
                }
            });
        }
        "BOOKMARK" => {}
        "ERROR" => {
            let code = event.object["code"].as_u64().unwrap_or(0);
            let message = event.object["message"].as_str().unwrap_or("").to_string();
            let gone = code == 410;
            let reason = format!("watch error {code}: {message}");
            observe(Observation::WatchEnded { gone, reason });
            // Any error event ends with a fresh LIST, as client-go's reflector does: a version the server cannot
            // serve (410, or a 504 "too large resource version" after a restore) would otherwise be asked for again
            // and again while the cache stays stale.
            return Some(WatchEnd::Relist);
        }
        other => tracing::debug!(kind = other, "ignoring a watch event of an unknown type"),
    }
    if let Some(v) = version {
        *last = v;
    }
    None
}

/// Exponential backoff with full jitter.
#[derive(Default)]
struct Backoff {
    bound: Option<Duration>,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let bound = self.bound.map_or(BACKOFF_FIRST, |b| (b * 2).min(BACKOFF_CAP));
        self.bound = Some(bound);
        bound.mul_f64(rand::random::<f64>())
    }

    fn reset(&mut self) {
        self.bound = None;
    }
}

impl Client {
    /// Opens a long-lived GET on a connection of its own (never pooled: it is busy until the stream ends).
    /// Returns the status and the body to read.
    pub(crate) async fn open_stream(&self, path: &str) -> Result<(u16, hyper::body::Incoming), KubeError> {
        let req = self.build_request(Method::GET, path, None).await?;
        let max_wait = self.limits.max_wait.min(self.limits.timeout);
        self.limiter
            .reserve(max_wait)
            .map_err(|t| KubeError::Throttled { max_wait, retry_after: t.retry_after })?
            .wait()
            .await;
        let mut sender = tokio::time::timeout(crate::REQUEST_TIMEOUT, self.connect()).await.map_err(|_| {
            KubeError::Transport(format!("GET {path}: no connection within {:?}", crate::REQUEST_TIMEOUT))
        })??;
        let resp = tokio::time::timeout(crate::REQUEST_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| KubeError::Transport(format!("GET {path}: no answer within {:?}", crate::REQUEST_TIMEOUT)))?
            .map_err(|e| KubeError::Transport(format!("GET {path} to {}: {e}", self.inner.config.server)))?;
        Ok((resp.status().as_u16(), resp.into_body()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, name: &str, rv: &str) -> Vec<u8> {
        serde_json::json!({"type": kind, "object": {"kind": "Lease", "metadata": {"name": name, "resourceVersion": rv},
            "spec": {"holderIdentity": name}}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn events_keep_the_cache_and_the_version_and_410_asks_for_a_relist() {
        let (cache, rx) = tokio::sync::watch::channel(LeaseSnapshot::default());
        let mut last = "1".to_string();
        let mut seen = Vec::new();
        let mut observe = |o: Observation| seen.push(format!("{o:?}"));
        assert!(apply(&cache, &event("ADDED", "a", "2"), &mut last, &mut observe).is_none());
        assert!(apply(&cache, &event("ADDED", "b", "3"), &mut last, &mut observe).is_none());
        assert!(apply(&cache, &event("MODIFIED", "a", "4"), &mut last, &mut observe).is_none());
        assert!(apply(&cache, &event("DELETED", "b", "5"), &mut last, &mut observe).is_none());
        let bookmark = br#"{"type":"BOOKMARK","object":{"kind":"Lease","metadata":{"resourceVersion":"9"}}}"#;
        assert!(apply(&cache, bookmark, &mut last, &mut observe).is_none());
        assert!(apply(&cache, b"  ", &mut last, &mut observe).is_none(), "blank lines are skipped");
        assert_eq!(last, "9", "resumes after the bookmark");
        let names: Vec<_> = rx.borrow().keys().cloned().collect();
        assert_eq!(names, ["a"]);
        assert_eq!(rx.borrow()["a"].metadata.resource_version.as_deref(), Some("4"));

        let gone = br#"{"type":"ERROR","object":{"kind":"Status","code":410,"message":"too old resource version"}}"#;
        assert!(matches!(apply(&cache, gone, &mut last, &mut observe), Some(WatchEnd::Relist)));
        let other = br#"{"type":"ERROR","object":{"kind":"Status","code":500,"message":"internal"}}"#;
        assert!(matches!(apply(&cache, other, &mut last, &mut observe), Some(WatchEnd::Relist)), "any error relists");
        assert!(matches!(apply(&cache, b"{not json", &mut last, &mut observe), Some(WatchEnd::Relist)));
        assert!(seen.iter().any(|s| s.contains("gone: true")), "{seen:?}");
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_under_the_bound() {
        let mut b = Backoff::default();
        let mut bounds = Vec::new();
        for _ in 0..10 {
            let w = b.next();
            let bound = b.bound.unwrap_or_default();
            assert!(w <= bound, "{w:?} within {bound:?}");
            bounds.push(bound);
        }
        assert_eq!(bounds[0], BACKOFF_FIRST);
        assert_eq!(bounds[1], BACKOFF_FIRST * 2);
        assert_eq!(*bounds.last().unwrap_or(&Duration::ZERO), BACKOFF_CAP);
        b.reset();
        b.next();
        assert_eq!(b.bound, Some(BACKOFF_FIRST));
    }
}
