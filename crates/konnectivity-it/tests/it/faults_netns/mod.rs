//! Fault injection with real processes in isolated networks (issue 10, and half-open detection, issue 7): a
//! `proxy-server` in one network namespace, a `proxy-agent` and its targets in another, one veth between them,
//! and the link or the processes broken in the ways production breaks them: a partition, loss and delay, a
//! half-open connection, SIGKILL of either side, restart loops, dial storms, stalled readers and frontends that
//! vanish mid-dial. Each scenario states its bounds, checks that frontends see errors rather than hangs, that
//! service comes back, and that nothing is left afterwards (no pending dial, no connection on either side, file
//! descriptors back to their baseline, runtime tasks back to their idle count). Measured figures are printed as `FAULTS <scenario> <what>: <value>`;
//! docs/reliability.md ("Fault injection") collects them.
//!
//! Every scenario has namespaces of its own, so they run in parallel (`--test-threads`); each needs root.

mod fabric;
mod link;
mod load;
mod netem;
mod processes;
mod traffic;
