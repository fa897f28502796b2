//! The server's tunnel state machine: a fake agent and a fake frontend drive the real stream loops
//! (`konnectivity_server::fuzzing`) with arbitrary packet sequences; after every step the harness checks that
//! the state is consistent and bounded by the input, and at the end that nothing is left.
#![no_main]

use arbitrary::Arbitrary;
use konnectivity_server::fuzzing::{Op, run};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

#[derive(Debug, Arbitrary)]
struct Input {
    /// `--backend-dial-timeout`, in ms, if set.
    backend_dial_timeout: Option<u16>,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let ops = &input.ops[..input.ops.len().min(200)];
    run(ops, input.backend_dial_timeout.map(|ms| Duration::from_millis(u64::from(ms) + 1)));
});
