//! Dial through a Konnectivity proxy-server, as kube-apiserver's konnectivity-client does.
//!
//! A [`Tunnel`] is one HTTP/2 connection to the server's frontend, over a Unix socket or TCP with mutual TLS.
//! Each [`Tunnel::dial`] opens one `/ProxyService/Proxy` stream and asks the server to connect to an address
//! in the cluster network; the returned [`TunnelConn`] is a tokio `AsyncRead + AsyncWrite` byte stream.
//!
//! * [`Tunnel::connect`] gives a reusable tunnel: many dials share the connection (one stream each).
//! * [`Tunnel::connect_single_use`] mirrors the reference's `CreateSingleUseGrpcTunnel`: one dial, after
//!   which the tunnel refuses others (reason `tunnelstarted`) and closes when the connection closes.
//!
//! * [`http_connect::dial`] dials through a server in HTTP CONNECT mode instead.
//! * [`EgressSelectorConfiguration`] reads kube-apiserver's `--egress-selector-config-file` into an
//!   [`EgressDialer`] that dials as kube-apiserver does (GRPC or HTTPConnect, over UDS or mTLS TCP).
//! * With the `connector` feature, `TunnelConnector` is a `tower::Service<http::Uri>` for hyper-util's legacy
//!   `Client`: every connection of the client's pool goes through the proxy-server.
//!
//! Failures carry a [`DialFailureReason`] with the reference's reason names.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod address;
mod conn;
#[cfg(feature = "connector")]
pub mod connector;
pub mod egress_config;
mod egress_dialer;
mod error;
pub mod http_connect;
pub mod metrics;
mod transport;
mod tunnel;

pub use address::ProxyAddress;
pub use conn::{CLOSE_TIMEOUT, TunnelConn};
#[cfg(feature = "connector")]
pub use connector::TunnelConnector;
pub use egress_config::{EgressConfigError, EgressSelectorConfiguration};
pub use egress_dialer::{EgressConn, EgressDialer};
pub use error::{DialError, DialFailureReason};
pub use tunnel::{DIAL_TIMEOUT, Tunnel};
