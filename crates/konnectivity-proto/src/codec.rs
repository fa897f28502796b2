//! The gRPC codec of both services: prost, with small initial buffers.
//!
//! tonic starts every stream with an 8 KiB encode buffer and an 8 KiB decode buffer. kube-apiserver opens a
//! stream (and an HTTP/2 connection) per tunnelled connection, and most sit idle, so those 16 KiB were the
//! largest part of an idle tunnel's cost on the server. The buffers still grow to the size of the messages a
//! busy stream carries.

use crate::Packet;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial encode/decode buffer per stream.
const INITIAL_BUFFER: usize = 1024;
/// Encoded bytes after which tonic hands a batch to the transport (its default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The codec of `/ProxyService/Proxy` and `/AgentService/Connect`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PacketCodec;

impl Codec for PacketCodec {
    type Encode = Packet;
    type Decode = Packet;
    type Encoder = <ProstCodec<Packet, Packet> as Codec>::Encoder;
    type Decoder = <ProstCodec<Packet, Packet> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<Packet, Packet>::raw_encoder(BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<Packet, Packet>::raw_decoder(BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD))
    }
}
