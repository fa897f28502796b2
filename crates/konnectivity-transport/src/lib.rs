//! Plumbing shared by the konnectivity-rs binaries and libraries: TLS material and configs (rustls, ring only),
//! listeners (Unix sockets and TLS over TCP with handshakes off the accept loop), the small HTTP server behind
//! the health and metrics ports, Go-style flag values, logging set-up and signal handling.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod budget;
pub mod egress_policy;
pub mod error_chain;
pub mod flags;
pub mod h2_authority;
pub mod hpack;
pub mod http_endpoints;
pub mod listen;
pub mod logging;
pub mod packet_counters;
pub mod process_metrics;
pub mod profiling;
pub mod signals;
pub mod tls;
pub mod tls_reload;
