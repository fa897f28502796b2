//! A token bucket, like client-go's default rate limiter.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allows `qps` operations per second on average, with bursts of up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(qps: f32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self { qps: f64::from(qps).max(f64::MIN_POSITIVE), burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// Takes one token now, or returns how long to wait for it (the token is reserved either way).
    pub fn reserve(&self) -> Duration {
        let Ok(mut s) = self.state.lock() else { return Duration::ZERO };
        let now = Instant::now();
        let (tokens, last) = *s;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.qps).min(self.burst) - 1.0;
        *s = (tokens, now);
        if tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-tokens / self.qps) }
    }

    /// Waits for a token.
    pub async fn acquire(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_paced() {
        let l = RateLimiter::new(10.0, 3);
        for _ in 0..3 {
            assert_eq!(l.reserve(), Duration::ZERO);
        }
        let w = l.reserve();
        assert!(w > Duration::from_millis(80) && w <= Duration::from_millis(100), "{w:?}");
        let w2 = l.reserve();
        assert!(w2 > Duration::from_millis(180) && w2 <= Duration::from_millis(200), "{w2:?}");
    }
}
