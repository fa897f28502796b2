//! Packet constructors and accessors.
//!
//! Go peers dispatch on `Packet.type`, never on which payload is present, so every packet we build sets both
//! through these constructors. On receipt, [`Packet::kind`] reads the pair back and rejects a packet whose
//! type and payload disagree instead of guessing.

use crate::generated::packet::Payload;
use crate::{CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain, Packet, PacketType};
use bytes::Bytes;

/// A received packet, checked: its type and payload agree.
#[derive(Debug, Clone, PartialEq)]
pub enum PacketKind {
    /// Open a connection to `address`; `random` is the dial ID.
    DialRequest(DialRequest),
    /// The outcome of a dial.
    DialResponse(DialResponse),
    /// Close an established connection.
    CloseRequest(CloseRequest),
    /// A connection was closed.
    CloseResponse(CloseResponse),
    /// Bytes of a connection.
    Data(Data),
    /// Flow-control credit for a connection (konnectivity-rs extension, see [`crate::flow`]).
    WindowUpdate {
        /// The connection.
        connect_id: i64,
        /// Credit returned, in cost units.
        credit: u32,
    },
    /// Abandon a dial that has no response yet.
    CloseDial(CloseDial),
    /// The agent is about to terminate.
    Drain,
}

impl Packet {
    /// A DIAL_REQ. `DIAL_REQ` is enum value 0, so its `type` does not appear on the wire.
    pub fn dial_request(address: impl Into<String>, random: i64) -> Self {
        Self::with(
            PacketType::DialReq,
            Payload::DialRequest(DialRequest { protocol: "tcp".into(), address: address.into(), random }),
        )
    }

    /// A DIAL_RSP; `error` empty means success.
    pub fn dial_response(random: i64, connect_id: i64, error: impl Into<String>) -> Self {
        Self::with(PacketType::DialRsp, Payload::DialResponse(DialResponse { error: error.into(), connect_id, random }))
    }

    /// A CLOSE_REQ for `connect_id`.
    pub fn close_request(connect_id: i64) -> Self {
        Self::with(PacketType::CloseReq, Payload::CloseRequest(CloseRequest { connect_id }))
    }

    /// A CLOSE_RSP for `connect_id`; `error` empty means a clean close.
    pub fn close_response(connect_id: i64, error: impl Into<String>) -> Self {
        Self::with(PacketType::CloseRsp, Payload::CloseResponse(CloseResponse { error: error.into(), connect_id }))
    }

    /// A DATA packet.
    pub fn data(connect_id: i64, data: Bytes) -> Self {
        Self::with(PacketType::Data, Payload::Data(Data { connect_id, error: String::new(), data, window_update: 0 }))
    }

    /// A flow-control credit (konnectivity-rs extension; only for peers that negotiated it).
    pub fn window_update(connect_id: i64, credit: u32) -> Self {
        Self::with(
            PacketType::Data,
            Payload::Data(Data { connect_id, error: String::new(), data: Bytes::new(), window_update: credit }),
        )
    }

    /// A DIAL_CLS for the dial `random`.
    pub fn close_dial(random: i64) -> Self {
        Self::with(PacketType::DialCls, Payload::CloseDial(CloseDial { random }))
    }

    /// A DRAIN.
    pub fn drain() -> Self {
        Self::with(PacketType::Drain, Payload::Drain(Drain {}))
    }

    fn with(kind: PacketType, payload: Payload) -> Self {
        Packet { r#type: kind as i32, payload: Some(payload) }
    }

    /// Checks that type and payload agree and returns the payload.
    ///
    /// Errors name what was wrong, for the log line and the error counters; the caller decides whether
    /// that ends the stream.
    pub fn kind(self) -> Result<PacketKind, MalformedPacket> {
        let declared = PacketType::try_from(self.r#type).map_err(|_| MalformedPacket::UnknownType(self.r#type))?;
        let payload = self.payload.ok_or(MalformedPacket::MissingPayload(declared))?;
        match (declared, payload) {
            (PacketType::DialReq, Payload::DialRequest(p)) => Ok(PacketKind::DialRequest(p)),
            (PacketType::DialRsp, Payload::DialResponse(p)) => Ok(PacketKind::DialResponse(p)),
            (PacketType::CloseReq, Payload::CloseRequest(p)) => Ok(PacketKind::CloseRequest(p)),
            (PacketType::CloseRsp, Payload::CloseResponse(p)) => Ok(PacketKind::CloseResponse(p)),
            (PacketType::Data, Payload::Data(p)) if p.window_update > 0 && p.data.is_empty() => {
                Ok(PacketKind::WindowUpdate { connect_id: p.connect_id, credit: p.window_update })
            }
            (PacketType::Data, Payload::Data(p)) => Ok(PacketKind::Data(p)),
            (PacketType::DialCls, Payload::CloseDial(p)) => Ok(PacketKind::CloseDial(p)),
            (PacketType::Drain, Payload::Drain(_)) => Ok(PacketKind::Drain),
            (declared, _) => Err(MalformedPacket::PayloadMismatch(declared)),
        }
    }

    /// The packet type's enum name as Go prints it (`DIAL_REQ`, …), `Unknown` for an unknown value; used as
    /// the `packet_type` metric label.
    pub fn type_name(&self) -> &'static str {
        PacketType::try_from(self.r#type).map(|t| t.as_str_name()).unwrap_or("Unknown")
    }
}

/// Why a received packet could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedPacket {
    /// `type` is not a known PacketType value.
    UnknownType(i32),
    /// `type` is known but no payload is set.
    MissingPayload(PacketType),
    /// The payload is not the one `type` says.
    PayloadMismatch(PacketType),
}

impl std::fmt::Display for MalformedPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MalformedPacket::UnknownType(t) => write!(f, "unknown packet type {t}"),
            MalformedPacket::MissingPayload(t) => write!(f, "{} packet without payload", t.as_str_name()),
            MalformedPacket::PayloadMismatch(t) => {
                write!(f, "{} packet with a payload of another type", t.as_str_name())
            }
        }
    }
}

impl std::error::Error for MalformedPacket {}

/// A short description of a packet for logs: its type and the IDs it carries, never its data.
pub fn describe(packet: &Packet) -> String {
    match &packet.payload {
        Some(Payload::DialRequest(d)) => format!("DIAL_REQ random={} address={}", d.random, d.address),
        Some(Payload::DialResponse(d)) => {
            format!("DIAL_RSP random={} connectID={} error={:?}", d.random, d.connect_id, d.error)
        }
        Some(Payload::CloseRequest(c)) => format!("CLOSE_REQ connectID={}", c.connect_id),
        Some(Payload::CloseResponse(c)) => format!("CLOSE_RSP connectID={} error={:?}", c.connect_id, c.error),
        Some(Payload::Data(d)) if d.window_update > 0 => {
            format!("WINDOW_UPDATE connectID={} credit={}", d.connect_id, d.window_update)
        }
        Some(Payload::Data(d)) => format!("DATA connectID={} len={}", d.connect_id, d.data.len()),
        Some(Payload::CloseDial(c)) => format!("DIAL_CLS random={}", c.random),
        Some(Payload::Drain(_)) => "DRAIN".to_string(),
        None => format!("{} without payload", packet.type_name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn hex(p: &Packet) -> String {
        p.encode_to_vec().iter().map(|b| format!("{b:02x}")).collect()
    }

    // Golden bytes, worked out by hand from the proto3 encoding rules: tag = field << 3 | wire type.
    // Packet.type is field 1 varint (08); payloads are length-delimited fields 2..8 (12, 1a, 22, 2a, 32, 3a, 42).
    #[test]
    fn dial_request_has_no_type_on_the_wire() {
        // 12 0d { 0a 03 "tcp" | 12 04 "a:80" | 18 05 }
        assert_eq!(hex(&Packet::dial_request("a:80", 5)), "120d0a037463701204613a38301805");
    }

    #[test]
    fn dial_response_bytes() {
        // 08 01 | 1a len { 0a 01 "x" 10 07 18 09 }
        assert_eq!(hex(&Packet::dial_response(9, 7, "x")), "08011a070a017810071809");
        // Success: empty error is omitted.
        assert_eq!(hex(&Packet::dial_response(9, 7, "")), "08011a0410071809");
    }

    #[test]
    fn close_and_data_bytes() {
        assert_eq!(hex(&Packet::close_request(3)), "08022a020803");
        assert_eq!(hex(&Packet::close_response(3, "")), "080332021003");
        assert_eq!(hex(&Packet::data(1, Bytes::from_static(b"hi"))), "0804220608011a026869");
        assert_eq!(hex(&Packet::close_dial(2)), "08053a020802");
        assert_eq!(hex(&Packet::drain()), "08064200");
    }

    #[test]
    fn round_trip_and_kind() {
        for p in [
            Packet::dial_request("[::1]:443", i64::MAX),
            Packet::dial_response(1, 2, "boom"),
            Packet::close_request(1),
            Packet::close_response(1, "Unknown connectID"),
            Packet::data(1, Bytes::from_static(b"payload")),
            Packet::close_dial(1),
            Packet::drain(),
            Packet::window_update(1, 4096),
        ] {
            let decoded = Packet::decode(p.encode_to_vec().as_slice()).expect("decodes");
            assert_eq!(decoded, p);
            assert!(decoded.kind().is_ok());
        }
    }

    #[test]
    fn window_update_is_an_extension_field_go_ignores() {
        // 08 04 | 22 06 { 08 01 | a0 06 (field 100, varint) 80 20 (4096) }
        assert_eq!(hex(&Packet::window_update(1, 4096)), "08042206 0801a0068020".replace(' ', ""));
        assert!(matches!(
            Packet::window_update(1, 4096).kind(),
            Ok(PacketKind::WindowUpdate { connect_id: 1, credit: 4096 })
        ));
        // Ordinary DATA never carries the field.
        assert!(!hex(&Packet::data(1, Bytes::from_static(b"x"))).contains("a006"));
    }

    #[test]
    fn absent_type_reads_as_dial_request() {
        // Only field 2 present, as a Go client sends a DIAL_REQ.
        let bytes = Packet::dial_request("h:1", 1).encode_to_vec();
        assert_eq!(bytes[0], 0x12);
        let p = Packet::decode(bytes.as_slice()).expect("decodes");
        assert!(matches!(p.kind(), Ok(PacketKind::DialRequest(_))));
    }

    #[test]
    fn malformed_packets_are_named() {
        let mismatched = Packet { r#type: PacketType::Data as i32, payload: Packet::close_request(1).payload };
        assert_eq!(mismatched.kind(), Err(MalformedPacket::PayloadMismatch(PacketType::Data)));
        let empty = Packet { r#type: PacketType::Data as i32, payload: None };
        assert_eq!(empty.kind(), Err(MalformedPacket::MissingPayload(PacketType::Data)));
        let unknown = Packet { r#type: 42, payload: None };
        assert_eq!(unknown.type_name(), "Unknown");
        assert_eq!(unknown.kind(), Err(MalformedPacket::UnknownType(42)));
        // Garbage bytes fail to decode rather than panic.
        assert!(Packet::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }
}
