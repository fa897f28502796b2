//! The agent's session with one server: a fake server drives the real receive loop
//! (`konnectivity_agent::fuzzing`) with arbitrary packets (dials to a local listener and to a closed port,
//! DATA, CLOSE_REQ, DIAL_CLS, unknown IDs, window updates); the harness checks bounds after every step and, at
//! the end, that no dial, connection, task or endpoint socket is left.
#![no_main]

use arbitrary::Arbitrary;
use konnectivity_agent::fuzzing::{Op, run};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    flow_control: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let ops = &input.ops[..input.ops.len().min(64)];
    run(ops, input.flow_control);
});
