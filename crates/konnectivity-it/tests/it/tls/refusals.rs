//! What the listeners refuse, and what refusing costs: unusable client certificates (counted), clients that
//! do not offer h2, and a thousand failed handshakes that leak nothing.

use super::*;

#[tokio::test]
async fn unusable_client_certificates_are_refused_and_counted_on_both_listeners() {
    let stack = Stack::new().expect("pki");
    let pki = OwnPki::new(stack.dir());
    let server = stack.start_server(pki.server_config(&stack, Frontend::TcpMtls)).await.expect("server");
    let frontend = frontend_tcp(&server.frontend_addr);
    let rogue = Ca::new("unrelated CA").expect("ca").leaf(&Leaf::client("rogue")).expect("rogue");
    let expired = pki.ca.leaf(&Leaf::client("expired-agent").expired()).expect("expired");
    let server_only = pki.ca.leaf(&Leaf::server("serverAuth-only")).expect("wrong usage");
    let base = Probe::trusting(&pki.ca.pem());
    let cases = [
        ("unknown CA", base.clone().presenting(&rogue), "bad_certificate"),
        ("expired", base.clone().presenting(&expired), "bad_certificate"),
        ("serverAuth-only key usage", base.clone().presenting(&server_only), "bad_certificate"),
        ("no client certificate", base.clone(), "no_certificate"),
    ];
    for (listener, addr) in [("agent", server.agent_addr), ("frontend", frontend)] {
        for (what, probe, reason) in &cases {
            let before = server.handle.metrics().tls_handshake_failures(listener, reason);
            let result = probe.run(addr).await;
            assert!(result.is_err(), "{listener} listener accepted a client with {what}");
            konnectivity_it::eventually!(
                5,
                server.handle.metrics().tls_handshake_failures(listener, reason) == before + 1,
                "{listener}: {what} not counted as {reason} ({result:?})"
            );
        }
        // A valid client still gets in, and sees the server's certificate.
        let ok = base.clone().presenting(&pki.agent).run(addr).await.expect("valid client refused");
        assert_eq!(ok.peer, der(&std::fs::read_to_string(&pki.server.0).expect("read")));
    }
    // And a real agent with a refused certificate never becomes an agent of the server.
    let mut config = stack.agent_config(server.agent_addr);
    config.ca_cert = pki.ca_file.clone();
    config.agent_cert = Some((write(stack.dir(), "exp.crt", &expired.0), write(stack.dir(), "exp.key", &expired.1)));
    let agent = stack.start_agent(config).await.expect("agent");
    konnectivity_it::eventually!(
        5,
        server.handle.metrics().tls_handshake_failures("agent", "bad_certificate") >= 5,
        "the expired agent's attempts were not counted"
    );
    assert_eq!(server.handle.agent_count(), 0);
    agent.stop().await;
    server.stop().await;
}

/// Set in the child process of [`a_thousand_failed_handshakes_leak_nothing`].
const CHURN_ENV: &str = "KONNECTIVITY_IT_HANDSHAKE_CHURN";

/// Runs [`failed_handshake_churn_in_this_process`] in a process of its own, where no other test opens file
/// descriptors or allocates memory meanwhile, and reports its figures.
#[tokio::test]
async fn a_thousand_failed_handshakes_leak_nothing() {
    let exe = std::env::current_exe().expect("test executable");
    let out = tokio::process::Command::new(exe)
        .args(["tls::refusals::failed_handshake_churn_in_this_process", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads=1"])
        .env(CHURN_ENV, "1")
        .output()
        .await
        .expect("run the churn test in a child process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints the child's output after the test's name, on the same line.
    for line in stdout.lines().filter_map(|l| l.find("churn:").map(|at| &l[at..])) {
        println!("{line}");
    }
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the churn child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_thousand_failed_handshakes_leak_nothing, in a process of its own"]
async fn failed_handshake_churn_in_this_process() {
    if std::env::var_os(CHURN_ENV).is_none() {
        return;
    }
    let stack = Stack::new().expect("pki");
    let pki = OwnPki::new(stack.dir());
    let server = stack.start_server(pki.server_config(&stack, Frontend::Uds)).await.expect("server");
    let rogue = Ca::new("unrelated CA").expect("ca").leaf(&Leaf::client("rogue")).expect("rogue");
    let expired = pki.ca.leaf(&Leaf::client("expired").expired()).expect("expired");
    let server_only = pki.ca.leaf(&Leaf::server("serverAuth-only")).expect("wrong usage");
    let base = Probe::trusting(&pki.ca.pem());
    let configs = [
        base.clone().presenting(&rogue).config(),
        base.clone().presenting(&expired).config(),
        base.clone().presenting(&server_only).config(),
        base.clone().config(),
    ];
    let failures = || {
        let m = server.handle.metrics();
        m.tls_handshake_failures("agent", "bad_certificate") + m.tls_handshake_failures("agent", "no_certificate")
    };
    let churn = |n: usize| {
        let configs = configs.clone();
        let addr = server.agent_addr;
        async move {
            use futures_util::StreamExt;
            let refused = futures_util::stream::iter(0..n)
                .map(|i| probe_with(addr, configs[i % configs.len()].clone()))
                .buffer_unordered(16)
                .filter(|r| std::future::ready(r.is_err()))
                .count()
                .await;
            assert_eq!(refused, n, "some bad handshakes were accepted");
        }
    };
    // Warm up (allocator arenas, lazily built tables), then measure around 1000 more.
    churn(200).await;
    konnectivity_it::eventually!(10, failures() == 200, "warm-up failures counted: {}", failures());
    let (fds, tasks) =
        konnectivity_it::steady(Duration::from_secs(2), || (konnectivity_it::open_fds(), alive_tasks())).await;
    let rss = konnectivity_it::resident_memory_bytes();
    let started = Instant::now();
    churn(1000).await;
    let took = started.elapsed();
    konnectivity_it::eventually!(10, failures() == 1200, "failures counted: {}", failures());
    konnectivity_it::eventually!(
        5,
        konnectivity_it::open_fds() <= fds,
        "fds: {fds} -> {}",
        konnectivity_it::open_fds()
    );
    konnectivity_it::eventually!(5, alive_tasks() <= tasks, "tasks: {tasks} -> {}", alive_tasks());
    let rss_after = konnectivity_it::resident_memory_bytes();
    println!(
        "churn: 1000 failed handshakes in {took:?}: fds {fds} -> {}, tokio tasks {tasks} -> {}, RSS {} KiB -> {} KiB",
        konnectivity_it::open_fds(),
        alive_tasks(),
        rss / 1024,
        rss_after / 1024
    );
    // Each handshake costs tens of KiB while it runs; 1000 of them retained would be tens of MiB.
    assert!(rss_after < rss + (4 << 20), "RSS grew from {} KiB to {} KiB", rss / 1024, rss_after / 1024);
    server.stop().await;
}

/// The agent port speaks gRPC, so, as the reference (Go's TLS stack and grpc-go), it refuses a client whose ALPN
/// list lacks h2 (`no_application_protocol` alert) and one that offers no ALPN at all (closed after the
/// handshake), counting both as `alpn`.
#[tokio::test]
async fn server_refuses_clients_that_do_not_offer_h2() {
    let stack = Stack::new().expect("pki");
    let server = stack.start_server(stack.server_config(Frontend::Uds)).await.expect("server");
    let ca = std::fs::read_to_string(&stack.pki.ca).expect("ca");
    let agent = (
        std::fs::read_to_string(&stack.pki.agent_cert).expect("cert"),
        std::fs::read_to_string(&stack.pki.agent_key).expect("key"),
    );
    let probe = Probe::trusting(&ca).presenting(&agent);
    let err = probe.clone().alpn(&["konnectivity"]).run(server.agent_addr).await.expect_err("no h2 offered");
    assert!(err.contains("NoApplicationProtocol"), "{err}");
    let err = probe.clone().alpn(&[]).run(server.agent_addr).await.expect_err("no ALPN");
    assert!(["closed", "close_notify", "reset"].iter().any(|w| err.contains(w)), "{err}");
    konnectivity_it::eventually!(
        5,
        server.handle.metrics().tls_handshake_failures("agent", "alpn") == 2,
        "ALPN refusals not counted"
    );
    let ok = probe.alpn(&["konnectivity", "h2"]).run(server.agent_addr).await.expect("h2 among others");
    assert_eq!(ok.alpn.as_deref(), Some(&b"h2"[..]));
    server.stop().await;
}
