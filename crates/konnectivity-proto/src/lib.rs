//! The Konnectivity wire protocol.
//!
//! Messages and services are generated from `proto/client.proto` and `proto/agent.proto` (package-less, so the
//! gRPC paths are `/ProxyService/Proxy` and `/AgentService/Connect`, as the Go reference has them). The
//! generated code is committed under `src/gen/` and checked against the protos by `tests/regenerate.rs`.
//!
//! Beyond the generated types this crate holds the packet constructors every component uses (so `type` and
//! payload are always set together) and every name a Go peer sees (metadata keys, error texts).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    include!("gen/konnectivity.rs");
}

pub use generated::*;

pub mod codec;
pub mod flow;
pub mod names;
pub mod packet_counters;
mod packets;

pub use packets::{MalformedPacket, PacketKind, describe};

/// gRPC server and client for `/AgentService/Connect`.
pub mod agent {
    pub use crate::generated::agent_service_client::AgentServiceClient;
    pub use crate::generated::agent_service_server::{AgentService, AgentServiceServer};
}

/// gRPC server and client for `/ProxyService/Proxy`.
pub mod proxy {
    pub use crate::generated::proxy_service_client::ProxyServiceClient;
    pub use crate::generated::proxy_service_server::{ProxyService, ProxyServiceServer};
}
