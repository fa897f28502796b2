//! `stream_packets_total` without a label lookup per packet.
//!
//! `IntCounterVec::with_label_values` hashes the label values on every call; the tunnel counts every packet it
//! moves, so each (segment, packet type) counter is resolved once, on first use (so the exposition lists only
//! series that occurred, as the reference's does), and then incremented directly.

use crate::PacketType;
use prometheus::{IntCounter, IntCounterVec};
use std::sync::OnceLock;

/// Slots per segment: one per PacketType (numbered from 0 to the last, DRAIN), and one for `Unknown`.
const TYPES: usize = PacketType::Drain as usize + 2;

/// The `packet_type` label value of PacketType number `t` (the generated name; `Unknown` for anything else).
fn type_name(t: usize) -> &'static str {
    i32::try_from(t).ok().and_then(|t| PacketType::try_from(t).ok()).map_or("Unknown", |t| t.as_str_name())
}

/// Cached counters of one `stream_packets_total` family, for a fixed list of segments.
pub struct PacketCounters {
    vec: IntCounterVec,
    segments: &'static [&'static str],
    slots: Vec<OnceLock<IntCounter>>,
}

impl PacketCounters {
    /// Counters of `vec` (labels `segment`, `packet_type`) for these segment names.
    pub fn new(vec: IntCounterVec, segments: &'static [&'static str]) -> Self {
        let slots = (0..segments.len() * TYPES).map(|_| OnceLock::new()).collect();
        Self { vec, segments, slots }
    }

    /// Counts one packet of PacketType number `packet_type` in segment number `segment`.
    pub fn inc(&self, segment: usize, packet_type: i32) {
        let t = usize::try_from(packet_type).ok().filter(|t| *t < TYPES - 1).unwrap_or(TYPES - 1);
        let Some(slot) = self.slots.get(segment * TYPES + t) else { return };
        slot.get_or_init(|| self.vec.with_label_values(&[self.segments[segment], type_name(t)])).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_into_the_right_series_and_only_those_used() {
        let vec = IntCounterVec::new(prometheus::Opts::new("p", "h"), &["segment", "packet_type"]).expect("vec");
        let c = PacketCounters::new(vec.clone(), &["from_agent", "to_agent"]);
        c.inc(0, 4);
        c.inc(0, 4);
        c.inc(1, 0);
        c.inc(1, 99);
        assert_eq!(vec.with_label_values(&["from_agent", "DATA"]).get(), 2);
        assert_eq!(vec.with_label_values(&["to_agent", "DIAL_REQ"]).get(), 1);
        assert_eq!(vec.with_label_values(&["to_agent", "Unknown"]).get(), 1);
        c.inc(7, 0); // an out-of-range segment is ignored, not a panic
    }
}
