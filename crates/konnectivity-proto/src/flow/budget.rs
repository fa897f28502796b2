//! A byte budget for a queue whose producer must not outrun its consumer by more than a bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// Tracks how much a queue holds (in any unit, usually bytes) and lets a producer wait for room.
#[derive(Debug, Default)]
pub struct QueueBudget {
    queued: AtomicUsize,
    drained: Notify,
}

impl QueueBudget {
    /// What the queue holds now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Records that `n` units were queued.
    pub fn add(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::AcqRel);
    }

    /// Records that `n` units left the queue, waking a waiting producer.
    pub fn release(&self, n: usize) {
        let _ = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(n)));
        self.drained.notify_waiters();
    }

    /// Waits until the queue holds less than `limit`, for at most `patience`; false if it did not drain in time.
    pub async fn wait_below(&self, limit: usize, patience: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.drained.notified();
                if self.queued() < limit {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(patience, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn waits_for_room_and_times_out() {
        let b = Arc::new(QueueBudget::default());
        b.add(100);
        assert!(!b.wait_below(50, Duration::from_millis(20)).await);
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.wait_below(50, Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        b.release(60);
        assert!(waiter.await.expect("join"));
        b.release(1000);
        assert_eq!(b.queued(), 0);
    }
}
