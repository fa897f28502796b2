//! `proxy-test-client`: sends HTTP requests through a proxy-server tunnel and prints the response body, with
//! the reference test client's flags. Errors go to stderr and make the exit status non-zero.
use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{ArgAction, Parser};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use konnectivity_client::{EgressDialer, EgressSelectorConfiguration, ProxyAddress};
use konnectivity_process::effective_flags::EffectiveFlags;
use konnectivity_process::flags::KlogFlags;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Sends HTTP requests through a Konnectivity proxy-server and prints the responses (konnectivity-rs).
#[derive(Debug, Parser)]
#[command(name = "proxy-test-client", version, about, long_about = None)]
struct Flags {
    /// Client certificate for the mTLS TCP frontend.
    #[arg(long, default_value = "")]
    client_cert: String,
    /// Key of --client-cert.
    #[arg(long, default_value = "")]
    client_key: String,
    /// CA of the proxy-server's certificate (TCP frontend).
    #[arg(long, default_value = "")]
    ca_cert: String,
    /// Protocol of the request sent through the tunnel.
    #[arg(long, default_value = "http")]
    request_proto: String,
    /// Path of the request (without the leading slash).
    #[arg(long, default_value = "success")]
    request_path: String,
    /// Host of the request, resolved by the agent in the cluster network.
    #[arg(long, default_value = "localhost")]
    request_host: String,
    /// Port of the request.
    #[arg(long, default_value_t = 8000)]
    request_port: u16,
    /// Proxy-server host (TCP frontend).
    #[arg(long, default_value = "localhost")]
    proxy_host: String,
    /// Proxy-server port (TCP frontend).
    #[arg(long, default_value_t = 8090)]
    proxy_port: u16,
    /// Proxy-server unix socket (instead of TCP).
    #[arg(long, default_value = "")]
    proxy_uds: String,
    /// Frontend protocol: grpc or http-connect.
    #[arg(long, default_value = "grpc")]
    mode: String,
    /// User-Agent of the request.
    #[arg(long, default_value = "test-client")]
    user_agent: String,
    /// How many times to send the request.
    #[arg(long, default_value_t = 1)]
    test_requests: u32,
    /// Seconds between requests.
    #[arg(long, default_value_t = 0)]
    test_delay: u64,
    /// Seconds to wait after the last request.
    #[arg(long, default_value_t = 0)]
    after_delay: u64,
    /// Close idle connections after each request (each request uses its own tunnel here, so always true).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true")]
    close_idle_conn: bool,
    /// HTTP/2 health checks of the reference's HTTP client; accepted, no effect (requests use HTTP/1.1).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true")]
    enable_http2_healthchecks: bool,
    /// kube-apiserver's EgressSelectorConfiguration file: dial as its `cluster` selection says (GRPC over uds,
    /// HTTPConnect over uds, or HTTPConnect over tcp with mTLS), instead of --mode, --proxy-uds, --proxy-host,
    /// --proxy-port, --ca-cert, --client-cert and --client-key (ours).
    #[arg(long, default_value = "")]
    egress_selector_config_file: String,
    /// klog flags.
    #[command(flatten)]
    klog: KlogFlags,
}

fn main() -> std::process::ExitCode {
    let (flags, effective) =
        EffectiveFlags::parse::<Flags>(konnectivity_process::flags::normalize_args(std::env::args()));
    let mut logging = flags.klog.log_settings("proxy-test-client");
    // The client's own lines stay at info (its output is the response body; -v above 4 only adds noise).
    logging.verbosity = logging.verbosity.min(3);
    if let Err(e) = konnectivity_process::logging::init_klog(logging) {
        eprintln!("proxy-test-client: {e}");
        return std::process::ExitCode::FAILURE;
    }
    effective.log();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proxy-test-client: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(flags)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy-test-client: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    flags.klog.check()?;
    if flags.request_proto != "http" {
        bail!("not supported yet: --request-proto={} (only http)", flags.request_proto);
    }
    let dialer = dialer(&flags)?;
    let target = konnectivity_transport::listen::join_host_port(&flags.request_host, flags.request_port);
    let path = format!("/{}", flags.request_path.trim_start_matches('/'));
    for i in 0..flags.test_requests {
        if i > 0 && flags.test_delay > 0 {
            tokio::time::sleep(Duration::from_secs(flags.test_delay)).await;
        }
        let conn =
            dialer.dial(&target).await.with_context(|| format!("dialing {target} through {:?}", dialer.proxy()))?;
        let body =
            get(conn, &target, &path, &flags.user_agent).await.with_context(|| format!("GET http://{target}{path}"))?;
        std::io::stdout().write_all(&body)?;
        std::io::stdout().flush()?;
    }
    if flags.after_delay > 0 {
        tokio::time::sleep(Duration::from_secs(flags.after_delay)).await;
    }
    Ok(())
}

/// How to reach the proxy-server: the egress selector file's `cluster` selection, or the proxy flags. Each
/// request opens its own tunnel (gRPC: a single-use one) or CONNECT request, as kube-apiserver does.
fn dialer(flags: &Flags) -> anyhow::Result<EgressDialer> {
    if !flags.egress_selector_config_file.is_empty() {
        let path = Path::new(&flags.egress_selector_config_file);
        let config = EgressSelectorConfiguration::load(path)?;
        return config.cluster_dialer(&flags.user_agent).with_context(|| format!("{}", path.display()));
    }
    let proxy = if !flags.proxy_uds.is_empty() {
        ProxyAddress::Uds(PathBuf::from(&flags.proxy_uds))
    } else {
        if flags.ca_cert.is_empty() || flags.client_cert.is_empty() || flags.client_key.is_empty() {
            bail!("the TCP frontend needs --ca-cert, --client-cert and --client-key (mTLS), or use --proxy-uds");
        }
        ProxyAddress::tcp_mtls(
            &flags.proxy_host,
            flags.proxy_port,
            flags.ca_cert.as_ref(),
            flags.client_cert.as_ref(),
            flags.client_key.as_ref(),
        )?
    };
    Ok(match flags.mode.as_str() {
        "grpc" => EgressDialer::Grpc(proxy),
        "http-connect" => EgressDialer::HttpConnect { proxy, user_agent: flags.user_agent.clone() },
        other => bail!("--mode must be 'grpc' or 'http-connect', got {other:?}"),
    })
}

async fn get<IO>(conn: IO, target: &str, path: &str, user_agent: &str) -> anyhow::Result<Bytes>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
    let driver = tokio::spawn(connection);
    let req = http::Request::get(path)
        .header(http::header::HOST, target)
        .header(http::header::USER_AGENT, user_agent)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    drop(sender);
    driver.abort();
    if !status.is_success() {
        bail!("status {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}
