//! The packet decoder: bytes as the gRPC layer receives them (length-prefixed messages, split into arbitrary
//! body chunks) through the crate's codec (`PacketCodec`, prost), then `Packet::kind()`, `describe` and a
//! re-encode round trip. Also the bare prost decode of the same bytes.
#![no_main]

use bytes::Bytes;
use http_body::Frame;
use http_body_util::StreamBody;
use konnectivity_proto::codec::PacketCodec;
use konnectivity_proto::{Packet, PacketKind, describe};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::convert::Infallible;
use std::task::{Context, Poll, Waker};
use tonic::codec::{Codec, Streaming};

fn check(packet: Packet) {
    let _ = describe(&packet);
    let _ = packet.type_name();
    let bytes = packet.encode_to_vec();
    assert_eq!(bytes.len(), packet.encoded_len());
    let again = Packet::decode(bytes.as_slice()).expect("a packet we encoded decodes");
    assert_eq!(again, packet, "round trip");
    match packet.clone().kind() {
        Ok(PacketKind::DialRequest(d)) => {
            let rebuilt = Packet::dial_request(d.address.clone(), d.random);
            assert!(matches!(rebuilt.kind(), Ok(PacketKind::DialRequest(_))));
        }
        Ok(PacketKind::WindowUpdate { credit, .. }) => assert!(credit > 0),
        Ok(_) | Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // The bare message.
    if let Ok(packet) = Packet::decode(data) {
        check(packet);
    }
    // The same bytes as a gRPC request body: the first byte picks the chunk size.
    let Some((&split, body)) = data.split_first() else { return };
    let chunk = usize::from(split % 64) + 1;
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> =
        body.chunks(chunk).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let mut stream = Streaming::new_request(PacketCodec.decoder(), body, None, Some(1 << 20));
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match futures_util::Stream::poll_next(std::pin::Pin::new(&mut stream), &mut cx) {
            Poll::Ready(Some(Ok(packet))) => check(packet),
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => break,
            Poll::Pending => panic!("a body that is all there never waits"),
        }
    }
});
