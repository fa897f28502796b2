//! Transport for the konnectivity-rs server, agent and client: TLS material and configs (rustls, ring only) with
//! reload on rotation, listeners (Unix sockets, and TLS over TCP with handshakes off the accept loop), and the
//! shim that lets h2 accept grpc-go's `:authority` over a Unix socket.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod error_chain;
pub mod h2_authority;
pub mod listen;
pub mod tls;
pub mod tls_reload;
