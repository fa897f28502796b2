//! The Konnectivity proxy-agent.
//!
//! Runs in the cluster network and dials *out* to the proxy-server, holding one long-lived
//! `/AgentService/Connect` stream per server. Over it the server asks the agent to open TCP connections
//! (DIAL_REQ) and carries their bytes (DATA) until either side closes (CLOSE_REQ / CLOSE_RSP).
//!
//! Use [`start`] (or [`run`]) with an [`AgentConfig`]; `proxy-agent` is a thin binary over this.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod agent;
pub mod config;
mod dialer;
mod drain;
mod endpoint;
mod error;
pub mod flags;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod handle;
mod lease_counter;
pub mod metrics;
mod server_set;
mod session;

pub use agent::{RunningAgent, run, start};
pub use config::{AgentConfig, LeaseCountConfig, ServerAddress};
pub use dialer::HEADER_TIMEOUT;
pub use error::AgentError;
pub use handle::{AddressStatus, AgentHandle};
