//! `konnectivity-bench`: konnectivity-rs and the Go reference side by side (see [`konnectivity_bench::side_by_side`]).
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    konnectivity_bench::side_by_side::run(konnectivity_bench::side_by_side::Args::parse()).await
}
