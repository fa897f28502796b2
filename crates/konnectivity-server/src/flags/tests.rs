//! The flags' parsing and validation.

use super::*;

fn parse(args: &[&str]) -> Result<ServerConfig, String> {
    let mut all = vec!["proxy-server".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let all = konnectivity_process::flags::normalize_args(all);
    ServerFlags::try_parse_from(all).map_err(|e| e.to_string())?.into_config().map_err(|e| e.to_string())
}

const BASE: [&str; 4] = ["--cluster-cert=/c", "--cluster-key=/k", "--uds-name=/tmp/s", "--server-port=0"];

#[test]
fn reference_command_line_parses() {
    let mut args = BASE.to_vec();
    args.extend([
        "--delete-existing-uds-file=false",
        "--keepalive-time=1h0m0s",
        "--frontend-keepalive-time=30s",
        "--backend-dial-timeout=5s",
        "--server-id=s1",
        "--server-count=3",
        "--v=5",
        "--logtostderr=true",
        "--warn-on-channel-limit",
        "--log_file_max_size=1800",
        "--cluster-ca-cert=/ca",
    ]);
    let c = parse(&args).expect("parses");
    assert_eq!(c.server_id, "s1");
    assert_eq!(c.server_count, 3);
    assert_eq!(c.backend_dial_timeout, Some(Duration::from_secs(5)));
    assert_eq!(c.frontend_keepalive_time, Duration::from_secs(30));
    assert!(matches!(c.frontend, FrontendListen::Uds { delete_existing: false, .. }));
}

#[test]
fn klog_destination_flags() {
    use konnectivity_process::logging::LogDestination;
    let flags = |extra: &[&str]| {
        let mut all = vec!["proxy-server".to_string()];
        all.extend(BASE.iter().chain(extra).map(|s| s.to_string()));
        ServerFlags::try_parse_from(konnectivity_process::flags::normalize_args(all)).expect("flags")
    };
    assert_eq!(flags(&["--log-file=/x"]).klog.destination("proxy-server"), LogDestination::Stderr);
    assert_eq!(
        flags(&["--logtostderr=false", "--log-file=/var/log/k.log", "--log-file-max-size=10"])
            .klog
            .destination("proxy-server"),
        LogDestination::File { path: "/var/log/k.log".into(), max_bytes: 10 << 20, stderr_from: tracing::Level::ERROR }
    );
    assert_eq!(
        flags(&["--logtostderr=false", "--log-dir=/d", "--alsologtostderr"]).klog.destination("proxy-server"),
        LogDestination::File {
            path: "/d/proxy-server.log".into(),
            max_bytes: 1800 << 20,
            stderr_from: tracing::Level::TRACE
        }
    );
    let mut args = BASE.to_vec();
    args.push("--stderrthreshold=LOUD");
    assert!(parse(&args).expect_err("threshold").contains("--stderrthreshold=LOUD"));
}

#[test]
fn token_auth_flags_follow_the_reference_rules() {
    const TOKEN: [&str; 3] = [
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        "--authentication-audience=system:konnectivity-server",
    ];
    let mut args = BASE.to_vec();
    args.extend(TOKEN);
    let auth = parse(&args).expect("token auth").agent_auth.expect("enabled");
    assert_eq!(auth, AgentAuthConfig::new("kube-system", "konnectivity-agent", "system:konnectivity-server"));
    args.extend(["--authentication-cache-ttl=0s", "--token-review-qps=2.5", "--token-review-burst=3"]);
    let auth = parse(&args).expect("no cache").agent_auth.expect("on");
    assert_eq!((auth.cache_ttl, auth.review_qps, auth.review_burst), (Duration::ZERO, 2.5, 3));
    for bad in ["--token-review-qps=0", "--token-review-qps=-1", "--token-review-burst=0"] {
        let mut args = BASE.to_vec();
        args.extend(TOKEN.iter().copied().chain([bad]));
        assert!(parse(&args).expect_err(bad).contains("must be greater than 0"), "{bad}");
    }
    for (missing, given) in TOKEN.iter().enumerate() {
        let mut args = BASE.to_vec();
        args.extend(TOKEN.iter().enumerate().filter(|(i, _)| *i != missing).map(|(_, a)| *a));
        let flag = given.split('=').next().unwrap_or_default();
        let err = parse(&args).expect_err(flag);
        assert_eq!(err, format!("{flag} cannot be empty when agent authentication is enabled"));
    }
    let mut args = BASE.to_vec();
    args.extend(TOKEN);
    args.push("--cluster-ca-cert=/ca");
    assert_eq!(
        parse(&args).expect_err("both"),
        "--cluster-ca-cert can not be used when agent authentication is enabled"
    );
    let mut args = BASE.to_vec();
    args.push("--kubeconfig=/nonexistent/kubeconfig");
    assert!(parse(&args).expect_err("kubeconfig").contains("no such file"));
    let mut args = BASE.to_vec();
    args.push("--kube-api-content-type=text/plain");
    assert!(parse(&args).expect_err("content type").contains("--kube-api-content-type"));
}

#[test]
fn lease_flags() {
    let mut args = BASE.to_vec();
    args.extend(["--enable-lease-controller", "--lease-label=k8s-app=konnectivity-server,tier=control-plane"]);
    let lease = parse(&args).expect("leases").lease.expect("enabled");
    assert_eq!(lease.namespace, "kube-system");
    assert_eq!(
        lease.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        ["k8s-app=konnectivity-server", "tier=control-plane"]
    );
    assert_eq!((lease.duration, lease.renew_interval), (Duration::from_secs(30), Duration::from_secs(15)));
    assert_eq!(parse(&BASE).expect("off").lease, None);
    for (flag, needle) in [
        ("--lease-label=", "must not be empty"),
        ("--lease-label=novalue", "is not key=value"),
        ("--lease-label=a b=c", "is not a valid label"),
        ("--lease-renew-interval=30s", "shorter than --lease-duration"),
        ("--lease-gc-interval=100ms", "at least 1s"),
    ] {
        let mut args = BASE.to_vec();
        args.extend(["--enable-lease-controller", flag]);
        let err = parse(&args).expect_err(flag);
        assert!(err.contains(needle), "{flag}: {err}");
    }
}

#[test]
fn cipher_suites() {
    let mut args = BASE.to_vec();
    args.extend([
        "--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305",
        "--cipher-suites=TLS_AES_128_GCM_SHA256",
    ]);
    assert!(!parse(&args).expect("supported names").cipher_suites.excludes_tls12());
    let mut args = BASE.to_vec();
    args.push("--cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA");
    let err = parse(&args).expect_err("CBC");
    assert!(
        err.starts_with("--cipher-suites: cipher suite TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA is not supported"),
        "{err}"
    );
    assert!(err.contains("supported TLS 1.2 suites: TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,"), "{err}");
    let mut args = BASE.to_vec();
    args.push("--cipher-suites=TLS_RSA_WITH_3DES_EDE_CBC_SHA");
    assert!(parse(&args).expect_err("3DES").contains("3DES"));
    let mut args = BASE.to_vec();
    args.push("--cipher-suites=AES128-GCM-SHA256");
    assert!(parse(&args).expect_err("OpenSSL name").contains("unknown cipher suite \"AES128-GCM-SHA256\""));
}

#[test]
fn audit_log_flags() {
    assert_eq!(parse(&BASE).expect("default").audit, None);
    let mut args = BASE.to_vec();
    args.push("--audit-log-path=-");
    assert_eq!(parse(&args).expect("stdout").audit.map(|a| a.output), Some(AuditOutput::Stdout));
    let mut args = BASE.to_vec();
    args.extend([
        "--audit-log-path=/var/log/konnectivity/audit.log",
        "--audit-log-max-size=10",
        "--audit-log-max-backups=0",
    ]);
    let audit = parse(&args).expect("file").audit.expect("enabled");
    assert_eq!(audit.output, AuditOutput::File("/var/log/konnectivity/audit.log".into()));
    assert_eq!((audit.max_size, audit.max_backups), (10 << 20, 0));
    let mut args = BASE.to_vec();
    args.extend(["--audit-log-path=/a", "--audit-log-max-size=-1"]);
    assert!(parse(&args).is_err());
    let mut args = BASE.to_vec();
    args.extend(["--audit-log-path=/a", "--audit-log-max-size=18446744073709551615"]);
    assert!(parse(&args).expect_err("overflow").contains("too large"));
}

#[test]
fn invalid_combinations_are_explained() {
    let err = parse(&["--cluster-cert=/c", "--cluster-key=/k", "--uds-name=/s"]).expect_err("port");
    assert!(err.contains("--server-port must be 0"), "{err}");
    let err = parse(&["--cluster-cert=/c", "--cluster-key=/k", "--server-cert=/a", "--server-key=/b"]).expect_err("ca");
    assert!(err.contains("requires --server-ca-cert"), "{err}");
    let err = parse(&["--uds-name=/s", "--server-port=0"]).expect_err("cluster cert");
    assert!(err.contains("--cluster-cert"), "{err}");
    let mut args = BASE.to_vec();
    args.push("--xfr-channel-size=0");
    assert!(parse(&args).expect_err("xfr").contains("greater than 0"));
    let mut args = BASE.to_vec();
    args.push("--keepalive-time=soon");
    assert!(parse(&args).expect_err("duration").contains("invalid duration"));
}

#[test]
fn keepalive_timeout() {
    assert_eq!(parse(&BASE).expect("defaults").keepalive_timeout, Duration::from_secs(20));
    let mut args = BASE.to_vec();
    args.push("--keepalive-timeout=2s");
    assert_eq!(parse(&args).expect("set").keepalive_timeout, Duration::from_secs(2));
    let mut args = BASE.to_vec();
    args.push("--keepalive-timeout=0s");
    assert!(parse(&args).expect_err("zero").contains("greater than 0"));
}

#[test]
fn agent_identity_flags() {
    use crate::config::IdentityMode;
    let identity = parse(&BASE).expect("defaults").agent_identity;
    assert_eq!(
        (identity.mode, identity.max_agent_ids_per_node, identity.max_agent_ids_per_shared_identity),
        (IdentityMode::Auto, 2, 0)
    );
    let dir = std::env::temp_dir().join(format!("grants-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::write(&dir, r#"{"grants": [{"node": "gw", "default-route": true}]}"#).expect("grants file");
    let mut args = BASE.to_vec();
    let grants = format!("--agent-identity-grants={}", dir.display());
    args.extend([
        "--agent-identity-mode=strict",
        grants.as_str(),
        "--max-agent-ids-per-node=1",
        "--agent-identity-node-cache-ttl=5s",
    ]);
    let identity = parse(&args).expect("set").agent_identity;
    assert_eq!((identity.mode, identity.max_agent_ids_per_node), (IdentityMode::Strict, 1));
    assert_eq!(identity.node_cache_ttl, Duration::from_secs(5));
    std::fs::write(&dir, r#"{"grants": [{"node": "gw", "cidr": ["nope"]}]}"#).expect("grants file");
    assert!(parse(&args).expect_err("bad grants").contains("--agent-identity-grants"));
    let _ = std::fs::remove_file(&dir);
    let mut args = BASE.to_vec();
    args.push("--agent-identity-mode=lenient");
    assert!(parse(&args).is_err());
}
