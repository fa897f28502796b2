//! TLS configurations that follow their files on disk: certificates, keys and CA bundles rotated by cert-manager,
//! a Kubernetes Secret volume (an atomic symlink swap) or by hand are picked up without a restart and without
//! touching established connections.
//!
//! A [`LiveConfig`] holds the configuration new handshakes use. [`watch`] builds it from its files, then polls
//! them every few seconds (content, not mtime: robust against symlink swaps and coarse timestamps); when they
//! change it builds a whole new rustls configuration and swaps it in. Rebuilding everything, rather than
//! swapping a certificate inside one configuration, also drops the old configuration's session cache, so a
//! session resumed after a CA change is verified against the new CA. If the new files do not form a usable
//! configuration (unparsable, a key that does not match its certificate, a file missing mid-update), the old
//! one stays, a warning says why, and the failure is counted; the next change is tried again.

use crate::tls::{ClientTlsSpec, FileContents, ServerTlsSpec, TlsError};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the files are checked by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The configuration new handshakes use: fixed, or replaced by [`watch`] when its files change. Cheap to clone;
/// clones share the configuration.
pub struct LiveConfig<C> {
    current: Arc<RwLock<Arc<C>>>,
}

impl<C> Clone for LiveConfig<C> {
    fn clone(&self) -> Self {
        Self { current: self.current.clone() }
    }
}

impl<C> std::fmt::Debug for LiveConfig<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveConfig")
    }
}

impl<C> LiveConfig<C> {
    /// A configuration that never changes.
    pub fn fixed(config: Arc<C>) -> Self {
        Self { current: Arc::new(RwLock::new(config)) }
    }

    /// The configuration to use for a new handshake.
    pub fn current(&self) -> Arc<C> {
        // A panic while holding the lock cannot leave a half-written Arc: the value is still whole.
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, config: Arc<C>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
    }
}

impl<C> From<Arc<C>> for LiveConfig<C> {
    fn from(config: Arc<C>) -> Self {
        Self::fixed(config)
    }
}

/// The result of one reload attempt, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The files changed and the new configuration is in use.
    Success,
    /// The files changed (or became unreadable) and could not be used; the previous configuration stays.
    Failure,
}

impl ReloadResult {
    /// The label value: `success` or `failure`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

/// Called after every reload attempt, to count them.
pub type ReloadHook = Arc<dyn Fn(ReloadResult) + Send + Sync>;

/// How a configuration follows its files.
#[derive(Clone)]
pub struct ReloadOptions {
    /// How often the files are checked; zero never checks (the configuration is fixed).
    pub interval: Duration,
    /// Told the result of every reload attempt.
    pub on_reload: Option<ReloadHook>,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        Self { interval: DEFAULT_RELOAD_INTERVAL, on_reload: None }
    }
}

/// Builds a configuration from `files` now (an error here is a start-up error), and, unless the interval is zero,
/// keeps rebuilding it whenever their contents change, in a task tracked by `tracker` that ends when `shutdown`
/// is cancelled. `what` names the configuration in logs.
pub fn watch<C, F>(
    what: &'static str,
    files: Vec<(&'static str, PathBuf)>,
    build: F,
    options: ReloadOptions,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<LiveConfig<C>, TlsError>
where
    C: Send + Sync + 'static,
    F: Fn(&FileContents) -> Result<C, TlsError> + Send + 'static,
{
    let contents = FileContents::read(&files)?;
    let live = LiveConfig::fixed(Arc::new(build(&contents)?));
    if options.interval.is_zero() {
        return Ok(live);
    }
    let mut seen = contents.fingerprint();
    drop(contents);
    let shutdown = shutdown.clone();
    let target = live.clone();
    tracker.spawn(async move {
        let report = |result: ReloadResult| {
            if let Some(hook) = &options.on_reload {
                hook(result);
            }
        };
        // The last read error reported, so that a file missing for minutes is reported once, not every poll.
        let mut read_error: Option<String> = None;
        let mut ticks = tokio::time::interval(options.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let contents = match FileContents::read_async(&files).await {
                Ok(c) => c,
                Err(e) => {
                    let text = e.to_string();
                    if read_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(tls = what, "cannot reload TLS files, keeping the ones in use: {text}");
                        report(ReloadResult::Failure);
                        read_error = Some(text);
                    }
                    continue;
                }
            };
            read_error = None;
            let fingerprint = contents.fingerprint();
            if fingerprint == seen {
                continue;
            }
            seen = fingerprint;
            match build(&contents) {
                Ok(config) => {
                    target.replace(Arc::new(config));
                    tracing::info!(tls = what, "TLS files changed: new handshakes use them");
                    report(ReloadResult::Success);
                }
                Err(e) => {
                    tracing::warn!(tls = what, "TLS files changed but cannot be used, keeping the ones in use: {e}");
                    report(ReloadResult::Failure);
                }
            }
        }
    });
    Ok(live)
}

/// [`watch`] for a TLS server listener.
pub fn watch_server(
    what: &'static str,
    spec: ServerTlsSpec,
    options: ReloadOptions,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<LiveConfig<rustls::ServerConfig>, TlsError> {
    watch(what, spec.files(), move |files| spec.build(files), options, shutdown, tracker)
}

/// [`watch`] for a TLS client (the agent's dialer).
pub fn watch_client(
    what: &'static str,
    spec: ClientTlsSpec,
    options: ReloadOptions,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<LiveConfig<rustls::ClientConfig>, TlsError> {
    watch(what, spec.files(), move |files| spec.build(files), options, shutdown, tracker)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A "configuration" that is the file's text; "bad" does not build.
    fn text(files: &FileContents, path: &std::path::Path) -> Result<String, TlsError> {
        let s = String::from_utf8_lossy(files.get(path)).to_string();
        if s == "bad" { Err(TlsError::Verifier("bad contents".into())) } else { Ok(s) }
    }

    #[tokio::test]
    async fn follows_the_file_keeps_the_last_good_one_and_stops() {
        let dir = std::env::temp_dir().join(format!("tls-reload-{}-{}", std::process::id(), line!()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("f");
        std::fs::write(&path, "one").expect("write");
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, f) = (ok.clone(), failed.clone());
        let hook: ReloadHook = Arc::new(move |r| {
            match r {
                ReloadResult::Success => &o,
                ReloadResult::Failure => &f,
            }
            .fetch_add(1, Ordering::SeqCst);
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let p = path.clone();
        let live = watch(
            "test",
            vec![("file", path.clone())],
            move |files| text(files, &p),
            ReloadOptions { interval: Duration::from_millis(20), on_reload: Some(hook) },
            &shutdown,
            &tracker,
        )
        .expect("initial");
        assert_eq!(*live.current(), "one");
        let wait = |n: &Arc<AtomicUsize>, want: usize| {
            let n = n.clone();
            async move {
                for _ in 0..250 {
                    if n.load(Ordering::SeqCst) >= want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("counter did not reach {want}");
            }
        };
        std::fs::write(&path, "two").expect("write");
        wait(&ok, 1).await;
        assert_eq!(*live.current(), "two");
        std::fs::write(&path, "bad").expect("write");
        wait(&failed, 1).await;
        assert_eq!(*live.current(), "two", "a bad file replaced the good configuration");
        std::fs::remove_file(&path).expect("remove");
        wait(&failed, 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(failed.load(Ordering::SeqCst), 2, "a missing file is reported once");
        std::fs::write(&path, "three").expect("write");
        wait(&ok, 2).await;
        assert_eq!(*live.current(), "three");
        shutdown.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await.expect("watcher ended");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_file_at_start_is_an_error() {
        let dir = std::env::temp_dir().join(format!("tls-reload-{}-{}", std::process::id(), line!()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("f");
        std::fs::write(&path, "bad").expect("write");
        let p = path.clone();
        let r = watch(
            "test",
            vec![("file", path.clone())],
            move |files| text(files, &p),
            ReloadOptions::default(),
            &CancellationToken::new(),
            &TaskTracker::new(),
        );
        assert!(r.is_err());
        let missing = watch(
            "test",
            vec![("file", dir.join("missing"))],
            |_| Ok(()),
            ReloadOptions::default(),
            &CancellationToken::new(),
            &TaskTracker::new(),
        );
        assert!(missing.expect_err("missing").to_string().contains("reading file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
