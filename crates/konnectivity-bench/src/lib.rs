//! konnectivity-bench: konnectivity-rs and the Go reference measured side by side on loopback with real
//! processes ([`side_by_side`], the `konnectivity-bench` binary), and a long mixed load watching for leaks
//! ([`soak`], the `konnectivity-soak` binary).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod chart;
pub mod procs;
pub mod scale;
pub mod scenarios;
pub mod side_by_side;
pub mod soak;
pub mod target;
