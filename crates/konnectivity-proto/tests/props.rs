//! Property tests: packets survive an encode/decode round trip whatever their fields, `kind()` reads back what
//! the constructors build, and the flow-control credit meter neither loses nor invents credit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use bytes::Bytes;
use konnectivity_proto::flow::{self, CreditMeter, UPDATE_THRESHOLD};
use konnectivity_proto::packet::Payload;
use konnectivity_proto::{
    CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain, Packet, PacketKind,
};
use proptest::prelude::*;
use prost::Message;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9:.\\[\\]]{1,40}", any::<String>()]
}

fn payload() -> impl Strategy<Value = Option<Payload>> {
    let id = prop_oneof![Just(0i64), 1i64..10, any::<i64>()];
    prop_oneof![
        Just(None),
        (text(), text(), id.clone()).prop_map(|(protocol, address, random)| Some(Payload::DialRequest(DialRequest {
            protocol,
            address,
            random
        }))),
        (text(), id.clone(), id.clone()).prop_map(|(error, connect_id, random)| Some(Payload::DialResponse(
            DialResponse { error, connect_id, random }
        ))),
        id.clone().prop_map(|connect_id| Some(Payload::CloseRequest(CloseRequest { connect_id }))),
        (text(), id.clone())
            .prop_map(|(error, connect_id)| Some(Payload::CloseResponse(CloseResponse { error, connect_id }))),
        (id.clone(), text(), proptest::collection::vec(any::<u8>(), 0..300), prop_oneof![Just(0u32), any::<u32>()])
            .prop_map(|(connect_id, error, data, window_update)| Some(Payload::Data(Data {
                connect_id,
                error,
                data: Bytes::from(data),
                window_update
            }))),
        id.prop_map(|random| Some(Payload::CloseDial(CloseDial { random }))),
        Just(Some(Payload::Drain(Drain {}))),
    ]
}

fn packet() -> impl Strategy<Value = Packet> {
    (prop_oneof![0i32..7, any::<i32>()], payload()).prop_map(|(r#type, payload)| Packet { r#type, payload })
}

/// A packet as our constructors build it, with the kind it must read back as.
fn constructed() -> impl Strategy<Value = (Packet, &'static str)> {
    let id = any::<i64>();
    prop_oneof![
        (text(), id).prop_map(|(a, r)| (Packet::dial_request(a, r), "dial_request")),
        (id, id, text()).prop_map(|(r, c, e)| (Packet::dial_response(r, c, e), "dial_response")),
        id.prop_map(|c| (Packet::close_request(c), "close_request")),
        (id, text()).prop_map(|(c, e)| (Packet::close_response(c, e), "close_response")),
        (id, proptest::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(c, d)| (Packet::data(c, Bytes::from(d)), "data")),
        (id, 1u32..).prop_map(|(c, w)| (Packet::window_update(c, w), "window_update")),
        id.prop_map(|r| (Packet::close_dial(r), "close_dial")),
        Just((Packet::drain(), "drain")),
    ]
}

fn kind_name(kind: &PacketKind) -> &'static str {
    match kind {
        PacketKind::DialRequest(_) => "dial_request",
        PacketKind::DialResponse(_) => "dial_response",
        PacketKind::CloseRequest(_) => "close_request",
        PacketKind::CloseResponse(_) => "close_response",
        PacketKind::Data(_) => "data",
        PacketKind::WindowUpdate { .. } => "window_update",
        PacketKind::CloseDial(_) => "close_dial",
        PacketKind::Drain => "drain",
    }
}

proptest! {
    /// Any packet, consistent or not, encodes to bytes that decode to the same packet, and reads the same way.
    #[test]
    fn encode_decode_round_trip(p in packet()) {
        let bytes = p.encode_to_vec();
        prop_assert_eq!(bytes.len(), p.encoded_len());
        let decoded = Packet::decode(bytes.as_slice()).expect("decodes");
        prop_assert_eq!(&decoded, &p);
        prop_assert_eq!(decoded.clone().kind(), p.clone().kind());
        let _ = konnectivity_proto::describe(&decoded);
    }

    /// What the constructors build reads back as what was built (a DATA with no bytes and no credit is DATA,
    /// not a window update).
    #[test]
    fn constructors_read_back(case in constructed()) {
        let (p, want) = case;
        let decoded = Packet::decode(p.encode_to_vec().as_slice()).expect("decodes");
        let kind = decoded.kind().expect("well-formed");
        prop_assert_eq!(kind_name(&kind), want);
    }

    /// Credit comes back in batches of at least the threshold, never more than was consumed, and less than one
    /// batch is ever held back. Costs are any u32 (the counter saturates: credit beyond u32::MAX in one batch is
    /// beyond any window, so the model drops it too).
    #[test]
    fn credit_meter_batches_without_loss(
        costs in proptest::collection::vec(prop_oneof![0u32..(2 << 20), any::<u32>(), (u32::MAX - (2 << 20))..], 1..200),
    ) {
        let meter = CreditMeter::default();
        let (mut consumed, mut returned, mut held) = (0u64, 0u64, 0u32);
        for cost in costs {
            consumed += u64::from(cost);
            held = held.saturating_add(cost);
            let want = (held >= UPDATE_THRESHOLD).then(|| std::mem::take(&mut held));
            let got = meter.consumed(cost);
            prop_assert_eq!(got, want);
            if let Some(credit) = got {
                prop_assert!(credit >= UPDATE_THRESHOLD, "a batch of {credit}");
                returned += u64::from(credit);
            }
            prop_assert!(returned <= consumed, "returned {returned} of {consumed}");
            prop_assert!(held < UPDATE_THRESHOLD);
        }
    }

    /// Realistic DATA sizes from several threads at once: what is returned plus what is left adds up to what
    /// was consumed.
    #[test]
    fn credit_meter_is_exact_under_concurrency(
        lens in proptest::collection::vec(proptest::collection::vec(0usize..(4 << 20), 1..50), 1..4),
    ) {
        let meter = std::sync::Arc::new(CreditMeter::default());
        let consumed: u64 = lens.iter().flatten().map(|&l| u64::from(flow::cost(l))).sum();
        let threads: Vec<_> = lens
            .into_iter()
            .map(|lens| {
                let meter = meter.clone();
                std::thread::spawn(move || {
                    lens.into_iter().filter_map(|l| meter.consumed(flow::cost(l))).map(u64::from).sum::<u64>()
                })
            })
            .collect();
        let returned: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        // Whatever is still held comes back with one more full batch.
        let rest = u64::from(meter.consumed(UPDATE_THRESHOLD).expect("a full batch returns")) - u64::from(UPDATE_THRESHOLD);
        prop_assert_eq!(returned + rest, consumed);
    }
}
