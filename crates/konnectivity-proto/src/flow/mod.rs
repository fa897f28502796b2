//! Per-connection flow control: a konnectivity-rs extension, negotiated, invisible to Go peers.
//!
//! The reference multiplexes every connection of an agent on one gRPC stream with no per-connection flow
//! control, so one slow reader either stalls all the others or has to be cut off. When both ends are ours, the
//! agent offers [`METADATA_KEY`] in its request metadata and the server echoes it in its response headers; from
//! then on, on that stream, each side may have at most [`WINDOW`] cost units of DATA in flight per connection
//! and direction, and the receiver returns credit (a DATA packet with only `windowUpdate` set) as its consumer
//! takes the data. Receive queues are then bounded by the window and never need to block the stream's reader.

mod budget;

pub use budget::QueueBudget;

use std::sync::atomic::{AtomicU32, Ordering};

/// Metadata key (request and response) that turns flow control on for one agent stream.
pub const METADATA_KEY: &str = "konnectivity-rs-flow-control";
/// The only version so far.
pub const VERSION: &str = "v1";
/// Credit each side starts with, per connection and direction, in cost units.
pub const WINDOW: u32 = 4 << 20;
/// Credit is returned once this much has been consumed (fewer, larger updates).
pub const UPDATE_THRESHOLD: u32 = WINDOW / 4;
/// Fixed cost of one DATA packet on top of its bytes, so a stream of tiny packets is bounded too.
pub const PACKET_OVERHEAD: u32 = 64;

/// The flow-control cost of a DATA packet carrying `len` bytes.
pub fn cost(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX).saturating_add(PACKET_OVERHEAD)
}

/// Counts consumed cost on the receiving side and says when to return credit.
#[derive(Debug, Default)]
pub struct CreditMeter {
    consumed: AtomicU32,
}

impl CreditMeter {
    /// Records that `cost` units were consumed; returns the credit to send now, if the threshold is reached.
    pub fn consumed(&self, cost: u32) -> Option<u32> {
        // Saturating, not wrapping: a wrapped counter would lose everything it held (found by the proptest
        // `credit_meter_batches_without_loss`). Credit beyond u32::MAX is beyond any window anyway.
        let before = self
            .consumed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| Some(c.saturating_add(cost)))
            .unwrap_or_else(|c| c);
        let total = before.saturating_add(cost);
        if total < UPDATE_THRESHOLD {
            return None;
        }
        let taken = self.consumed.swap(0, Ordering::AcqRel);
        (taken > 0).then_some(taken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_is_returned_in_batches_and_never_lost() {
        let meter = CreditMeter::default();
        let mut returned = 0u64;
        let mut consumed = 0u64;
        for len in (0..10_000).map(|i| (i * 7919) % 70_000) {
            consumed += u64::from(cost(len));
            if let Some(c) = meter.consumed(cost(len)) {
                assert!(c >= UPDATE_THRESHOLD);
                returned += u64::from(c);
            }
        }
        let outstanding = consumed - returned;
        assert!(outstanding < u64::from(UPDATE_THRESHOLD), "{outstanding} units never returned");
    }

    /// Regression (found by the proptest `credit_meter_batches_without_loss`): the counter wrapped past
    /// u32::MAX and the credit it held was never returned.
    #[test]
    fn huge_costs_saturate_instead_of_wrapping() {
        let meter = CreditMeter::default();
        assert_eq!(meter.consumed(440_493), None);
        assert_eq!(meter.consumed(4_294_526_803), Some(u32::MAX));
        assert_eq!(meter.consumed(UPDATE_THRESHOLD), Some(UPDATE_THRESHOLD));
    }

    #[test]
    fn cost_bounds_tiny_packets() {
        assert_eq!(cost(0), PACKET_OVERHEAD);
        assert_eq!(cost(1000), 1000 + PACKET_OVERHEAD);
        assert_eq!(cost(usize::MAX), u32::MAX);
    }
}
