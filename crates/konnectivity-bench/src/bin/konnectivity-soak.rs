//! `konnectivity-soak`: a long mixed load against real processes, watching for leaks (see
//! [`konnectivity_bench::soak`]). Exits 1 when a check of the verdict fails.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if !konnectivity_bench::soak::run(konnectivity_bench::soak::Args::parse()).await? {
        std::process::exit(1);
    }
    Ok(())
}
