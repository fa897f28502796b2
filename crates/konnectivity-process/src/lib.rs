//! Process plumbing shared by the konnectivity-rs binaries: Go-style (pflag/klog) command lines, klog-style
//! logging, signal handling, the small HTTP server behind the health, metrics and admin ports, CPU profiles, and
//! the process metrics the reference exposes.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod effective_flags;
pub mod entry;
pub mod flags;
pub mod http_endpoints;
pub mod klog_format;
pub mod logging;
pub mod metric_set;
pub mod process_metrics;
pub mod profiling;
pub mod signals;
