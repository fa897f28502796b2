//! konnectivity-rs integration tests: one binary, real sockets, real TLS, real server and agent.
// Tests: a failed `expect` is the test failing, with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod audit;
mod bad_input;
mod connect;
mod drain;
mod e2e;
mod e2e_deploy;
mod egress_client;
mod faults;
mod faults_netns;
mod flow;
mod ha;
mod house;
mod identity;
mod interop;
mod limits;
mod logs;
mod monitoring;
mod observability;
mod policy;
mod policy_holes;
mod reference_suite;
mod routing;
mod routing_netns;
mod tls;
mod token_storm;
mod tunnel;
