//! The Konnectivity proxy-server.
//!
//! kube-apiserver (the *frontend*) opens a `/ProxyService/Proxy` stream per connection it wants in the cluster
//! network; agents there hold `/AgentService/Connect` streams to us. The server pairs the two: it forwards the
//! dial to an agent, records the connection under (agent stream, connect ID), and relays bytes both ways.
//!
//! Use [`start`] (or [`run`]) with a [`ServerConfig`] and a cancellation token; `proxy-server` is a thin
//! binary over this.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod audit;
mod auth;
mod backend;
pub mod config;
mod credentials;
pub mod flags;
mod frontend;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod handle;
mod identity;
pub mod lease;
pub mod metrics;
mod review_cache;
pub mod routing;
mod server;
mod tunnels;

pub use auth::TOKEN_REVIEW_TIMEOUT;
pub use backend::identifiers::AgentIdentifiers;
pub use config::{
    AgentIdentityConfig, AuditConfig, AuditOutput, FrontendListen, FrontendMode, IdentityMode, ServerConfig,
};
pub use frontend::http_connect::{CONNECTION_ESTABLISHED, dial_error_status};
pub use handle::{AgentInfo, ServerHandle};
pub use identity::grants::Grants;
pub use server::{FrontendAddr, RunningServer, ServerError, run, start};
