//! Property tests of the server's connection table: random sequences of agent and frontend streams opening,
//! dialing, answering, sending, closing and going away, through the same harness as the `server_state` fuzz
//! target (`fuzz/`), with its checks after every step and at the end.

use super::*;
use proptest::prelude::*;

fn stream_end() -> impl Strategy<Value = StreamEnd> {
    prop_oneof![Just(StreamEnd::Eof), Just(StreamEnd::Error), Just(StreamEnd::TransportLost)]
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        4 => Just(Answer::Connected),
        2 => Just(Answer::Refused),
        1 => Just(Answer::NoConnectId),
        1 => Just(Answer::ReusedConnectId),
    ]
}

fn raw_packet() -> impl Strategy<Value = RawPacket> {
    prop_oneof![
        (-1i8..8, any::<u8>(), -2i8..9, -2i8..9, any::<bool>(), any::<u8>(), prop_oneof![Just(0u32), any::<u32>()])
            .prop_map(|(kind, payload, random, connect_id, error, len, window)| RawPacket::Parts {
                kind,
                payload,
                random,
                connect_id,
                error,
                len,
                window
            }),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(RawPacket::Bytes),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let ix = any::<u8>;
    prop_oneof![
        2 => (ix(), any::<bool>()).prop_map(|(id, flow_control)| Op::AgentConnect { id, flow_control }),
        1 => (ix(), stream_end()).prop_map(|(agent, how)| Op::AgentEnd { agent, how }),
        4 => (ix(), ix(), answer()).prop_map(|(agent, dial, answer)| Op::AgentAnswer { agent, dial, answer }),
        3 => (ix(), ix(), 0u16..20_000).prop_map(|(agent, conn, len)| Op::AgentData { agent, conn, len }),
        1 => (ix(), ix(), 1u32..(8 << 20)).prop_map(|(agent, conn, credit)| Op::AgentWindow { agent, conn, credit }),
        2 => (ix(), ix(), any::<bool>()).prop_map(|(agent, conn, error)| Op::AgentClose { agent, conn, error }),
        1 => (ix(), ix()).prop_map(|(agent, dial)| Op::AgentCancel { agent, dial }),
        1 => ix().prop_map(|agent| Op::AgentDrain { agent }),
        1 => (ix(), raw_packet()).prop_map(|(agent, packet)| Op::AgentRaw { agent, packet }),
        1 => (ix(), any::<bool>()).prop_map(|(agent, on)| Op::AgentReading { agent, on }),
        3 => Just(Op::FrontendOpen),
        1 => (ix(), stream_end()).prop_map(|(frontend, how)| Op::FrontendEnd { frontend, how }),
        4 => (ix(), ix()).prop_map(|(frontend, random)| Op::FrontendDial { frontend, random }),
        3 => (ix(), 0u16..20_000).prop_map(|(frontend, len)| Op::FrontendData { frontend, len }),
        2 => ix().prop_map(|frontend| Op::FrontendClose { frontend }),
        1 => (ix(), ix()).prop_map(|(frontend, random)| Op::FrontendCancel { frontend, random }),
        1 => (ix(), raw_packet()).prop_map(|(frontend, packet)| Op::FrontendRaw { frontend, packet }),
        1 => (ix(), any::<bool>()).prop_map(|(frontend, on)| Op::FrontendReading { frontend, on }),
        1 => (0u16..1000).prop_map(|millis| Op::Sleep { millis }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Pending dials and connections never exceed what the input created, every gauge matches the tables,
    /// and once every stream has ended nothing is left.
    #[test]
    fn connection_table_invariants(
        ops in proptest::collection::vec(op(), 1..100),
        timeout in proptest::option::of((1u64..10_000).prop_map(Duration::from_millis)),
    ) {
        run(&ops, timeout);
    }
}

/// The lifecycle the fuzz target starts from, step by step: dial, connect, data both ways, then the agent is
/// lost with a connection open and a second dial pending.
#[test]
fn agent_loss_leaves_nothing_behind() {
    use Op::*;
    run(
        &[
            AgentConnect { id: 0, flow_control: true },
            FrontendOpen,
            FrontendDial { frontend: 0, random: 1 },
            AgentAnswer { agent: 0, dial: 0, answer: Answer::Connected },
            FrontendData { frontend: 0, len: 100 },
            AgentData { agent: 0, conn: 0, len: 100 },
            FrontendOpen,
            FrontendDial { frontend: 1, random: 2 },
            AgentEnd { agent: 0, how: StreamEnd::TransportLost },
        ],
        None,
    );
}

/// Runs a scenario on a thread of its own and fails if it does not end within `limit` (real time).
fn run_within(limit: std::time::Duration, ops: Vec<Op>, backend_dial_timeout: Option<Duration>) {
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        run(&ops, backend_dial_timeout);
        let _ = done.send(());
    });
    match finished.recv_timeout(limit) {
        Ok(()) => runner.join().expect("scenario"),
        // A panic in the scenario drops the sender: report the panic, not a hang.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => runner.join().expect("scenario"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("scenario did not end within {limit:?}: a hang"),
    }
}

/// Regression (found by the `server_state` fuzz target, as a libFuzzer timeout): a frontend that reused a dial
/// ID after its first dial had timed out left the first dial's passed deadline in its list, so the session's
/// timer fired again at once, forever: the task spun a core until the stream ended.
#[test]
fn reusing_a_timed_out_dial_id_does_not_spin() {
    use Op::*;
    run_within(
        std::time::Duration::from_secs(30),
        vec![
            FrontendOpen,
            AgentConnect { id: 0, flow_control: false },
            FrontendDial { frontend: 0, random: 7 },
            Sleep { millis: 65535 },
            FrontendDial { frontend: 0, random: 7 },
            Sleep { millis: 65535 },
        ],
        Some(Duration::from_millis(36_751)),
    );
}

/// A frontend that stops reading while a Go agent (no flow control) sends to it is cut off after the stall limit;
/// the agent's CLOSE_RSP for that connection then arrives while the frontend's stream is still open.
#[test]
fn stalled_frontend_then_agent_close() {
    use Op::*;
    let mut ops = vec![
        AgentConnect { id: 0, flow_control: false },
        FrontendOpen,
        FrontendDial { frontend: 0, random: 1 },
        AgentAnswer { agent: 0, dial: 0, answer: Answer::Connected },
        FrontendReading { frontend: 0, on: false },
    ];
    // 5 MiB: past the 4 MiB a frontend may hold queued.
    ops.extend((0..20).map(|_| AgentData { agent: 0, conn: 0, len: 16_384 }));
    ops.extend([
        Sleep { millis: 1000 },
        AgentClose { agent: 0, conn: 0, error: false },
        FrontendData { frontend: 0, len: 10 },
    ]);
    run_within(std::time::Duration::from_secs(30), ops, None);
}
