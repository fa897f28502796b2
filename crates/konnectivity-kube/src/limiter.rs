//! A token bucket, like client-go's default rate limiter, except that a wait is a [`Reservation`]: bounded
//! (a slot further away than the caller's `max_wait` is refused, not promised), and given back when the caller
//! leaves before using it. Client-go's limiter promises every caller a slot however far away, and a caller who
//! gives up still keeps its slot: in a reconnect storm the queue then runs minutes ahead, filled with callers
//! long gone, while kube-apiserver sits idle.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Allows `qps` operations per second on average, with bursts of up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    qps: f64,
    burst: f64,
    /// Tokens in the bucket (negative: promised to reservations not yet due) as of the instant.
    state: Mutex<(f64, Instant)>,
}

/// The limiter has no slot within the caller's `max_wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// How much later a reservation would fit within the same `max_wait` (if nobody else takes it first).
    pub retry_after: Duration,
}

/// A slot promised at [`Reservation::ready_at`]. [`Reservation::wait`] waits for it and uses it; dropping the
/// reservation (or the future of `wait`) before then gives the slot back, so that the callers behind it move up.
#[derive(Debug)]
#[must_use = "a reservation not waited for is given back at once"]
pub struct Reservation {
    limiter: Arc<RateLimiter>,
    ready_at: Instant,
    used: bool,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(qps: f32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self { qps: f64::from(qps).max(f64::MIN_POSITIVE), burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// Reserves the next token if it is due within `max_wait` from now; otherwise takes nothing.
    pub fn reserve(self: &Arc<Self>, max_wait: Duration) -> Result<Reservation, Throttled> {
        let now = Instant::now();
        // A poisoned lock means a panic elsewhere while holding it; limiting nothing beats failing everything.
        let Ok(mut state) = self.state.lock() else {
            return Ok(Reservation { limiter: self.clone(), ready_at: now, used: true });
        };
        let tokens = self.refilled(*state, now) - 1.0;
        // A tiny rate makes the wait overflow a Duration: that is "not within any max_wait".
        let wait = if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::try_from_secs_f64(-tokens / self.qps).unwrap_or(Duration::MAX)
        };
        if wait > max_wait {
            return Err(Throttled { retry_after: wait.saturating_sub(max_wait) });
        }
        *state = (tokens, now);
        Ok(Reservation { limiter: self.clone(), ready_at: now + wait, used: false })
    }

    fn refilled(&self, (tokens, last): (f64, Instant), now: Instant) -> f64 {
        (tokens + now.saturating_duration_since(last).as_secs_f64() * self.qps).min(self.burst)
    }

    fn give_back(&self) {
        let now = Instant::now();
        if let Ok(mut state) = self.state.lock() {
            *state = ((self.refilled(*state, now) + 1.0).min(self.burst), now);
        }
    }
}

impl Reservation {
    /// When the slot is due.
    pub fn ready_at(&self) -> Instant {
        self.ready_at
    }

    /// Waits until the slot is due, and uses it.
    pub async fn wait(mut self) {
        tokio::time::sleep_until(self.ready_at).await;
        self.used = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.used {
            self.limiter.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delay(r: &Reservation) -> Duration {
        r.ready_at().saturating_duration_since(Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_paced() {
        let l = Arc::new(RateLimiter::new(10.0, 3));
        let mut held = Vec::new();
        for _ in 0..3 {
            let r = l.reserve(Duration::ZERO).expect("burst");
            assert_eq!(delay(&r), Duration::ZERO);
            r.wait().await;
        }
        let r = l.reserve(Duration::from_secs(1)).expect("paced");
        assert_eq!(delay(&r), Duration::from_millis(100));
        held.push(r);
        let r = l.reserve(Duration::from_secs(1)).expect("paced");
        assert_eq!(delay(&r), Duration::from_millis(200));
        held.push(r);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded_and_a_refusal_takes_nothing() {
        let l = Arc::new(RateLimiter::new(10.0, 1));
        let first = l.reserve(Duration::ZERO).expect("the burst");
        let second = l.reserve(Duration::from_millis(500)).expect("within the bound");
        assert_eq!(delay(&second), Duration::from_millis(100));
        // The next slot is 200 ms away: refused with a 50 ms wait allowed, and the refusal reserved nothing.
        let refused = l.reserve(Duration::from_millis(50)).expect_err("past the bound");
        assert_eq!(refused.retry_after, Duration::from_millis(150));
        let third = l.reserve(Duration::from_secs(1)).expect("the same slot, still free");
        assert_eq!(delay(&third), Duration::from_millis(200));
        first.wait().await;
        drop((second, third));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_who_leaves_gives_its_slot_back() {
        let l = Arc::new(RateLimiter::new(1.0, 1));
        l.reserve(Duration::ZERO).expect("the burst").wait().await;
        // 100 callers queue for 100 s worth of slots, and all give up: the queue is empty again.
        let queued: Vec<_> = (0..100).map(|_| l.reserve(Duration::from_secs(1000)).expect("queued")).collect();
        assert_eq!(delay(&queued[99]), Duration::from_secs(100));
        drop(queued);
        let next = l.reserve(Duration::from_secs(1000)).expect("next");
        assert_eq!(delay(&next), Duration::from_secs(1), "the slots of callers gone were given back");

        // Leaving mid-wait (the future of `wait` dropped) gives the slot back too.
        let waiting = tokio::spawn(next.wait());
        tokio::time::sleep(Duration::from_millis(500)).await;
        waiting.abort();
        assert!(waiting.await.expect_err("aborted").is_cancelled());
        let after = l.reserve(Duration::from_secs(1000)).expect("after");
        assert_eq!(delay(&after), Duration::from_millis(500), "the slot of the aborted wait was given back");

        // A slot used is not given back.
        after.wait().await;
        let later = l.reserve(Duration::from_secs(1000)).expect("later");
        assert_eq!(delay(&later), Duration::from_secs(1));
    }
}
