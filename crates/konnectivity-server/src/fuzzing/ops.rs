//! The steps a fuzzing scenario is made of, and how a raw packet step becomes a packet.

use bytes::Bytes;
use konnectivity_proto::{Packet, packet};
use prost::Message;

/// At most this many agent streams in one scenario.
pub(crate) const MAX_AGENTS: usize = 6;
/// At most this many frontend streams in one scenario.
pub(crate) const MAX_FRONTENDS: usize = 12;
/// Dial IDs are drawn from this range, so that they collide.
pub(crate) const DIAL_IDS: u8 = 8;
/// The largest DATA payload a scenario sends.
pub(crate) const MAX_DATA: usize = 256 * 1024;

/// One step of a scenario. Indexes (`agent`, `frontend`, `dial`, `conn`) pick among what exists, modulo its
/// count; a step that finds nothing to act on does nothing.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub enum Op {
    /// An agent opens a stream; `id` picks one of four agent IDs, so one agent may hold several streams.
    AgentConnect {
        /// Which agent ID.
        id: u8,
        /// Whether it negotiated flow control.
        flow_control: bool,
    },
    /// An agent stream ends.
    AgentEnd {
        /// Which stream.
        agent: u8,
        /// How.
        how: StreamEnd,
    },
    /// An agent answers a DIAL_REQ it received.
    AgentAnswer {
        /// Which stream.
        agent: u8,
        /// Which of the dials it received.
        dial: u8,
        /// What it answers.
        answer: Answer,
    },
    /// An agent sends DATA on a connection it opened.
    AgentData {
        /// Which stream.
        agent: u8,
        /// Which of its connections.
        conn: u8,
        /// Payload length, times 16.
        len: u16,
    },
    /// An agent returns flow-control credit.
    AgentWindow {
        /// Which stream.
        agent: u8,
        /// Which of its connections.
        conn: u8,
        /// Credit.
        credit: u32,
    },
    /// An agent closes one of its connections (CLOSE_RSP).
    AgentClose {
        /// Which stream.
        agent: u8,
        /// Which of its connections.
        conn: u8,
        /// With an error text.
        error: bool,
    },
    /// An agent cancels a dial (DIAL_CLS).
    AgentCancel {
        /// Which stream.
        agent: u8,
        /// Which of the dials it received.
        dial: u8,
    },
    /// An agent says it is draining.
    AgentDrain {
        /// Which stream.
        agent: u8,
    },
    /// An agent sends an arbitrary packet.
    AgentRaw {
        /// Which stream.
        agent: u8,
        /// What.
        packet: RawPacket,
    },
    /// Whether the agent takes what the server queues for it.
    AgentReading {
        /// Which stream.
        agent: u8,
        /// Reading or not.
        on: bool,
    },
    /// A frontend opens a stream.
    FrontendOpen,
    /// A frontend stream ends.
    FrontendEnd {
        /// Which stream.
        frontend: u8,
        /// How (a lost transport reads as an error here).
        how: StreamEnd,
    },
    /// A frontend dials.
    FrontendDial {
        /// Which stream.
        frontend: u8,
        /// The dial ID, modulo 8.
        random: u8,
    },
    /// A frontend sends DATA on its connection.
    FrontendData {
        /// Which stream.
        frontend: u8,
        /// Payload length, times 16.
        len: u16,
    },
    /// A frontend closes its connection (CLOSE_REQ).
    FrontendClose {
        /// Which stream.
        frontend: u8,
    },
    /// A frontend cancels a dial (DIAL_CLS).
    FrontendCancel {
        /// Which stream.
        frontend: u8,
        /// The dial ID, modulo 8.
        random: u8,
    },
    /// A frontend sends an arbitrary packet.
    FrontendRaw {
        /// Which stream.
        frontend: u8,
        /// What.
        packet: RawPacket,
    },
    /// Whether the frontend takes what the server queues for it.
    FrontendReading {
        /// Which stream.
        frontend: u8,
        /// Reading or not.
        on: bool,
    },
    /// Time passes: `millis` times 8 ms.
    Sleep {
        /// How long, in units of 8 ms.
        millis: u16,
    },
}

/// How a stream ends.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub enum StreamEnd {
    /// The peer half-closes it.
    Eof,
    /// It fails with a gRPC status.
    Error,
    /// The connection under it dies (agents: noticed by the transport even while the reader is busy).
    TransportLost,
}

/// An agent's answer to a dial.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub enum Answer {
    /// Connected, with a fresh connection ID.
    Connected,
    /// Failed, with an error text.
    Refused,
    /// Neither error nor connection ID.
    NoConnectId,
    /// Connected, with the connection ID of an earlier connection.
    ReusedConnectId,
}

/// A packet from loosely constrained parts (any type with any payload, IDs from a small range so they collide
/// with real ones), or bytes decoded as a packet.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "fuzzing", derive(arbitrary::Arbitrary))]
pub enum RawPacket {
    /// Built from parts.
    Parts {
        /// The `type` field (0..=6 are known; others are not).
        kind: i8,
        /// Which payload (0 none, 1..=7 the payload types, in field order).
        payload: u8,
        /// Dial ID.
        random: i8,
        /// Connection ID.
        connect_id: i8,
        /// Whether the error text is set.
        error: bool,
        /// DATA length.
        len: u8,
        /// DATA window update.
        window: u32,
    },
    /// Protobuf bytes (skipped unless they decode).
    Bytes(Vec<u8>),
}

impl RawPacket {
    /// The packet, if it is one.
    pub fn to_packet(&self) -> Option<Packet> {
        match self {
            RawPacket::Bytes(b) => Packet::decode(b.as_slice()).ok(),
            RawPacket::Parts { kind, payload, random, connect_id, error, len, window } => {
                let (random, connect_id) = (i64::from(*random), i64::from(*connect_id));
                let error = if *error { "fuzz error".to_string() } else { String::new() };
                let payload = match payload % 8 {
                    0 => None,
                    1 => Some(packet::Payload::DialRequest(konnectivity_proto::DialRequest {
                        protocol: "tcp".into(),
                        address: "10.0.0.1:80".into(),
                        random,
                    })),
                    2 => Some(packet::Payload::DialResponse(konnectivity_proto::DialResponse {
                        error,
                        connect_id,
                        random,
                    })),
                    3 => Some(packet::Payload::Data(konnectivity_proto::Data {
                        connect_id,
                        error,
                        data: Bytes::from(vec![0x5a; usize::from(*len)]),
                        window_update: *window,
                    })),
                    4 => Some(packet::Payload::CloseRequest(konnectivity_proto::CloseRequest { connect_id })),
                    5 => Some(packet::Payload::CloseResponse(konnectivity_proto::CloseResponse { error, connect_id })),
                    6 => Some(packet::Payload::CloseDial(konnectivity_proto::CloseDial { random })),
                    _ => Some(packet::Payload::Drain(konnectivity_proto::Drain {})),
                };
                Some(Packet { r#type: i32::from(*kind), payload })
            }
        }
    }
}
