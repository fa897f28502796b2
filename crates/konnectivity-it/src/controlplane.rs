//! A real Kubernetes control plane in two isolated networks, for end-to-end tests.
//!
//! ```text
//!   control netns                                   cluster netns
//!   ─────────────                                   ─────────────
//!   etcd        127.0.0.1:2379                      proxy-agent ──dials──▶ 198.19.255.1:8132
//!   kube-apiserver :6443 ── egress selector ──▶     kubelet-like HTTPS  198.18.0.10:10250
//!   proxy-server  (UDS or mTLS TCP frontend,        "pod" HTTP          198.18.1.20:8080
//!                  agent port :8132)                admission webhook   198.18.1.30:8443
//!   decoys on 198.18.0.10, .1.20, .1.30  (the same addresses, counting every hit)
//!          198.19.255.1/30 ◀──────── veth ────────▶ 198.19.255.2/30
//! ```
//!
//! The control network has no route to the cluster addresses: they exist there too, as decoys. Whatever
//! kube-apiserver reaches in the cluster, it reaches through the tunnel, or it hits a decoy (and the test fails).
//!
//! kube-apiserver, kubectl and etcd are the real binaries, built from the Go module proxy by
//! `controlplane/build.sh`; proxy-server and proxy-agent are this workspace's binaries.

use crate::netns::{NetNs, veth};
use crate::targets::{Target, serve_listener};
use anyhow::{Context, bail};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use konnectivity_testkit::ChildProcess;
use konnectivity_testkit::TempDir;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::ServerName;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// The control side of the veth link: where agents (and the agent-side kubeconfig) reach the control plane.
pub const CONTROL_LINK: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
/// The cluster side of the veth link.
pub const CLUSTER_LINK: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 2);
/// The node's InternalIP: the kubelet-like server in the cluster, a decoy in the control network.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The "pod" behind the test Service.
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
/// The admission webhook's pod.
pub const WEBHOOK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 30);
/// Kubelet port.
pub const KUBELET_PORT: u16 = 10250;
/// The pod's HTTP port.
pub const POD_PORT: u16 = 8080;
/// The webhook's HTTPS port.
pub const WEBHOOK_PORT: u16 = 8443;
/// kube-apiserver's secure port (in the control network).
pub const KAS_PORT: u16 = 6443;
/// proxy-server's agent port.
pub const AGENT_PORT: u16 = 8132;
/// proxy-server's mTLS TCP frontend (HTTPConnect over TCP mode), on the control loopback.
pub const FRONTEND_PORT: u16 = 8131;
/// proxy-server admin (metrics) port, control loopback.
pub const SERVER_ADMIN_PORT: u16 = 8133;
/// proxy-server health port, control loopback.
pub const SERVER_HEALTH_PORT: u16 = 8134;
/// proxy-agent admin (metrics) port, cluster loopback.
pub const AGENT_ADMIN_PORT: u16 = 8094;
/// proxy-agent health port, cluster loopback.
pub const AGENT_HEALTH_PORT: u16 = 8093;
/// The Node object the fixture creates.
pub const NODE_NAME: &str = "node-1";
/// The ServiceAccount issuer (and default API audience) of the fixture's kube-apiserver.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How kube-apiserver reaches proxy-server (one `cluster` egress selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressMode {
    /// proxyProtocol GRPC over the Unix socket.
    GrpcUds,
    /// proxyProtocol HTTPConnect over the Unix socket.
    ConnectUds,
    /// proxyProtocol HTTPConnect over TCP with mutual TLS.
    ConnectMtls,
}

/// Where the real control-plane binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// etcd server.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kubectl.
    pub kubectl: PathBuf,
}

impl Binaries {
    /// `$KONNECTIVITY_CONTROLPLANE_DIR` if set, else whatever `controlplane/build.sh` prints (it builds what is
    /// missing and reuses its cache otherwise).
    pub fn locate() -> anyhow::Result<Self> {
        static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let dir = match DIR.get() {
            Some(d) => d.clone(),
            None => {
                let d = Self::find_dir()?;
                DIR.get_or_init(|| d).clone()
            }
        };
        let bins =
            Self { etcd: dir.join("etcd"), kube_apiserver: dir.join("kube-apiserver"), kubectl: dir.join("kubectl") };
        for b in [&bins.etcd, &bins.kube_apiserver, &bins.kubectl] {
            if !b.exists() {
                bail!("{} is missing: run controlplane/build.sh (scripts/test does)", b.display());
            }
        }
        Ok(bins)
    }

    fn find_dir() -> anyhow::Result<PathBuf> {
        Ok(match std::env::var_os("KONNECTIVITY_CONTROLPLANE_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../controlplane/build.sh");
                let out = Command::new(&script)
                    .stderr(Stdio::inherit())
                    .output()
                    .with_context(|| format!("running {}", script.display()))?;
                if !out.status.success() {
                    bail!("{} failed ({})", script.display(), out.status);
                }
                let text = String::from_utf8_lossy(&out.stdout);
                PathBuf::from(text.lines().last().unwrap_or_default().trim())
            }
        })
    }
}

/// A binary of this workspace (proxy-server, proxy-agent, ...), next to the running test executable.
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/it-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).context("test executable has no target dir")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} is missing: run `cargo build --bins` (scripts/test does)", p.display());
    }
    Ok(p)
}

/// Every certificate and key the fixture uses, all from one CA, written to the fixture's directory.
#[derive(Debug, Clone)]
pub struct ClusterPki {
    /// The CA (trusted by everything).
    pub ca: PathBuf,
    /// The CA's private key (to sign more certificates in tests).
    pub ca_key: PathBuf,
    /// kube-apiserver serving certificate and key.
    pub kas: (PathBuf, PathBuf),
    /// An administrator client certificate (O=system:masters).
    pub admin: (PathBuf, PathBuf),
    /// kube-apiserver's client certificate towards kubelets.
    pub kas_kubelet_client: (PathBuf, PathBuf),
    /// kube-apiserver's client certificate towards proxy-server (HTTPConnect over mTLS).
    pub kas_egress_client: (PathBuf, PathBuf),
    /// The kubelet-like server's certificate (IP SAN = the node IP).
    pub kubelet: (PathBuf, PathBuf),
    /// The webhook's certificate (DNS SAN webhook.default.svc).
    pub webhook: (PathBuf, PathBuf),
    /// proxy-server's certificate (agent port and TCP frontend).
    pub server: (PathBuf, PathBuf),
    /// proxy-agent's client certificate.
    pub agent: (PathBuf, PathBuf),
    /// The ServiceAccount token signing key (ECDSA P-256, PKCS#8).
    pub sa_key: PathBuf,
    /// Its public key.
    pub sa_pub: PathBuf,
}

fn leaf(
    dir: &Path,
    name: &str,
    cn: &str,
    org: Option<&str>,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'_, KeyPair>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

impl ClusterPki {
    /// Generates everything into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "konnectivity-rs e2e CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_key_pem = ca_key.serialize_pem();
        let root = CertifiedIssuer::self_signed(params, ca_key)?;
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, root.pem())?;
        let ca_key_path = dir.join("ca.key");
        std::fs::write(&ca_key_path, ca_key_pem)?;
        let link = CONTROL_LINK.to_string();
        let node = NODE_IP.to_string();
        let sa_key = dir.join("sa.key");
        let sa = KeyPair::generate()?;
        std::fs::write(&sa_key, sa.serialize_pem())?;
        let sa_pub = dir.join("sa.pub");
        std::fs::write(&sa_pub, sa.public_key_pem())?;
        Ok(Self {
            kas: leaf(
                dir,
                "kube-apiserver",
                "kube-apiserver",
                None,
                &[
                    "127.0.0.1",
                    &link,
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "10.96.0.1",
                ],
                ServerAuth,
                &root,
            )?,
            admin: leaf(dir, "admin", "e2e-admin", Some("system:masters"), &[], ClientAuth, &root)?,
            kas_kubelet_client: leaf(
                dir,
                "kas-kubelet-client",
                "kube-apiserver-kubelet-client",
                Some("system:masters"),
                &[],
                ClientAuth,
                &root,
            )?,
            kas_egress_client: leaf(dir, "kas-egress-client", "kube-apiserver", None, &[], ClientAuth, &root)?,
            kubelet: leaf(dir, "kubelet", NODE_NAME, None, &[&node], ServerAuth, &root)?,
            webhook: leaf(dir, "webhook", "webhook", None, &["webhook.default.svc"], ServerAuth, &root)?,
            server: leaf(
                dir,
                "proxy-server",
                "proxy-server",
                None,
                &["127.0.0.1", &link, "localhost"],
                ServerAuth,
                &root,
            )?,
            agent: leaf(dir, "proxy-agent", "proxy-agent", None, &[], ClientAuth, &root)?,
            sa_key,
            sa_pub,
            ca,
            ca_key: ca_key_path,
        })
    }
}

/// Agents authenticate with ServiceAccount tokens instead of client certificates.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// `--agent-namespace`.
    pub namespace: String,
    /// `--agent-service-account`.
    pub service_account: String,
    /// `--authentication-audience`.
    pub audience: String,
}

impl Default for TokenAuth {
    fn default() -> Self {
        Self {
            namespace: "kube-system".into(),
            service_account: "konnectivity-agent".into(),
            audience: "system:konnectivity-server".into(),
        }
    }
}

/// What the fixture starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// How kube-apiserver reaches proxy-server.
    pub mode: EgressMode,
    /// Extra proxy-server flags.
    pub server_args: Vec<String>,
    /// Start a proxy-agent in the cluster network (and wait until the server has it).
    pub agent: bool,
    /// Extra proxy-agent flags.
    pub agent_args: Vec<String>,
    /// Token authentication of agents (the server gets the admin kubeconfig for its TokenReviews; the agent a
    /// token from the TokenRequest API for that service account and audience, and no client certificate).
    pub token_auth: Option<TokenAuth>,
}

impl Options {
    /// One server, one agent, the given mode, no extra flags.
    pub fn new(mode: EgressMode) -> Self {
        Self { mode, server_args: Vec::new(), agent: true, agent_args: Vec::new(), token_auth: None }
    }
}

/// Hit counters of the in-cluster endpoints and of the decoys.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests the kubelet-like server answered.
    pub kubelet_requests: AtomicU64,
    /// Log-follow streams open now on the kubelet-like server.
    pub log_streams_open: AtomicUsize,
    /// Lines those streams have written.
    pub log_lines: AtomicU64,
    /// Requests the pod answered.
    pub pod_requests: AtomicU64,
    /// AdmissionReviews the webhook answered.
    pub webhook_reviews: AtomicU64,
    /// Connections the decoys in the control network accepted (must stay 0).
    pub decoy_hits: AtomicU64,
}

/// The running fixture. Dropping it stops every process and deletes both namespaces.
pub struct ControlPlane {
    /// Scratch directory (PKI, configs, logs, the UDS, etcd data).
    pub dir: TempDir,
    /// Certificates.
    pub pki: ClusterPki,
    /// The control network (etcd, kube-apiserver, proxy-server, decoys).
    pub control: Arc<NetNs>,
    /// The cluster network (proxy-agent, kubelet, pod, webhook).
    pub cluster: Arc<NetNs>,
    /// The real binaries.
    pub bins: Binaries,
    /// Egress mode in use.
    pub mode: EgressMode,
    /// etcd.
    pub etcd: ChildProcess,
    /// kube-apiserver.
    pub kas: ChildProcess,
    /// proxy-server (ours), if running.
    pub server: Option<ChildProcess>,
    /// proxy-agent (ours), if running.
    pub agent: Option<ChildProcess>,
    /// Servers started with [`ControlPlane::start_extra_server`].
    pub extra_servers: Vec<ChildProcess>,
    /// Endpoint and decoy counters.
    pub counters: Arc<Counters>,
    /// A kubeconfig (admin identity) usable in the control network.
    pub kubeconfig: PathBuf,
    options: Options,
    kas_client: Arc<rustls::ClientConfig>,
    _servers: Vec<Target>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// True when this process may create network namespaces (the e2e tests need root).
pub fn can_create_netns() -> bool {
    nix::unistd::geteuid().is_root()
}

impl ControlPlane {
    /// Builds the networks, starts etcd, kube-apiserver, proxy-server and (optionally) proxy-agent and the
    /// cluster endpoints, creates the Node, the Services with their EndpointSlices and the webhook
    /// configuration, and returns when kube-apiserver is ready and the server has the agent.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        let bins = Binaries::locate()?;
        let dir = TempDir::new("krs-e2e")?;
        let pki = ClusterPki::generate(dir.path())?;
        let id = format!("{}{}", std::process::id() % 100_000, NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let control = Arc::new(NetNs::create(&format!("krs-c{id}"))?);
        let cluster = Arc::new(NetNs::create(&format!("krs-k{id}"))?);
        let (veth_c, veth_k) = (format!("kc{id}"), format!("kk{id}"));
        veth(&control, &veth_c, &format!("{CONTROL_LINK}/30"), &cluster, &veth_k, &format!("{CLUSTER_LINK}/30"))?;
        // The overlapping addresses: real endpoints in the cluster, decoys in the control network.
        for ns in [&control, &cluster] {
            for addr in [NODE_IP, POD_IP, WEBHOOK_IP] {
                ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
            }
        }

        let counters = Arc::new(Counters::default());
        let mut servers = Vec::new();
        // Decoys: accept and count, in the control network.
        for addr in [(NODE_IP, KUBELET_PORT), (POD_IP, POD_PORT), (WEBHOOK_IP, WEBHOOK_PORT)] {
            let listener = control.listen(SocketAddr::from(addr))?;
            let c = counters.clone();
            servers.push(serve_listener(listener, move |mut tcp, _| {
                c.decoy_hits.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _ = tcp.write_all(b"HTTP/1.1 418 I'm a decoy in the control network\r\n\r\n").await;
                }
            })?);
        }
        servers.extend(start_cluster_endpoints(&cluster, &pki, &counters)?);

        let kas_client = konnectivity_transport::tls::client_config(
            &pki.ca,
            Some((&pki.admin.0, &pki.admin.1)),
            &[b"http/1.1".to_vec()],
        )?;
        let kubeconfig = dir.path().join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, &format!("https://127.0.0.1:{KAS_PORT}"), &pki.ca, &pki.admin)?;
        let agent_kubeconfig = dir.path().join("agent.kubeconfig");
        write_kubeconfig(&agent_kubeconfig, &format!("https://{CONTROL_LINK}:{KAS_PORT}"), &pki.ca, &pki.admin)?;

        let etcd_data = dir.path().join("etcd");
        let etcd = control.spawn_process(
            "etcd",
            Command::new(&bins.etcd).args([
                "--name=e2e".into(),
                format!("--data-dir={}", etcd_data.display()),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=e2e=http://127.0.0.1:2380".into(),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ]),
            dir.path().join("etcd.log"),
        )?;

        let egress = dir.path().join("egress-selector.yaml");
        let uds = dir.path().join("konnectivity.sock");
        std::fs::write(&egress, egress_config(options.mode, &uds, &pki))?;
        let kas = control.spawn_process(
            "kube-apiserver",
            Command::new(&bins.kube_apiserver).args([
                "--etcd-servers=http://127.0.0.1:2379".into(),
                format!("--secure-port={KAS_PORT}"),
                "--bind-address=0.0.0.0".into(),
                format!("--advertise-address={CONTROL_LINK}"),
                format!("--cert-dir={}", dir.path().join("kas-certs").display()),
                format!("--tls-cert-file={}", pki.kas.0.display()),
                format!("--tls-private-key-file={}", pki.kas.1.display()),
                format!("--client-ca-file={}", pki.ca.display()),
                format!("--service-account-issuer={SA_ISSUER}"),
                format!("--service-account-key-file={}", pki.sa_pub.display()),
                format!("--service-account-signing-key-file={}", pki.sa_key.display()),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=Node,RBAC".into(),
                format!("--egress-selector-config-file={}", egress.display()),
                format!("--kubelet-client-certificate={}", pki.kas_kubelet_client.0.display()),
                format!("--kubelet-client-key={}", pki.kas_kubelet_client.1.display()),
                format!("--kubelet-certificate-authority={}", pki.ca.display()),
                "--kubelet-preferred-address-types=InternalIP".into(),
                // Webhooks and aggregated APIs are dialed at their endpoint addresses (no kube-proxy here).
                "--enable-aggregator-routing=true".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ]),
            dir.path().join("kube-apiserver.log"),
        )?;

        let mut cp = Self {
            pki,
            control,
            cluster,
            bins,
            mode: options.mode,
            etcd,
            kas,
            server: None,
            agent: None,
            extra_servers: Vec::new(),
            counters,
            kubeconfig,
            options: options.clone(),
            kas_client,
            _servers: servers,
            dir,
        };
        cp.wait_kas_ready(Duration::from_secs(90)).await?;
        cp.start_server()?;
        cp.wait_http(&cp.control, SERVER_HEALTH_PORT, "/healthz", Duration::from_secs(20)).await?;
        if options.agent {
            cp.start_agent(&[]).await?;
            cp.wait_backends(1, Duration::from_secs(20)).await?;
        }
        cp.create_cluster_objects().await?;
        Ok(cp)
    }

    /// The proxy-server flags the fixture uses (before `Options::server_args`).
    fn server_args(&self) -> Vec<String> {
        let pki = &self.pki;
        let mut args = vec![
            format!("--cluster-cert={}", pki.server.0.display()),
            format!("--cluster-key={}", pki.server.1.display()),
            "--agent-bind-address=0.0.0.0".into(),
            format!("--agent-port={AGENT_PORT}"),
            format!("--admin-port={SERVER_ADMIN_PORT}"),
            format!("--health-port={SERVER_HEALTH_PORT}"),
            "--health-bind-address=127.0.0.1".into(),
            "--server-id=e2e-server-1".into(),
        ];
        match self.mode {
            EgressMode::GrpcUds | EgressMode::ConnectUds => {
                let mode = if self.mode == EgressMode::GrpcUds { "grpc" } else { "http-connect" };
                args.push(format!("--mode={mode}"));
                args.push(format!("--uds-name={}", self.dir.path().join("konnectivity.sock").display()));
                args.push("--delete-existing-uds-file".into());
                args.push("--server-port=0".into());
            }
            EgressMode::ConnectMtls => {
                args.push("--mode=http-connect".into());
                args.push(format!("--server-port={FRONTEND_PORT}"));
                args.push("--server-bind-address=127.0.0.1".into());
                args.push(format!("--server-cert={}", pki.server.0.display()));
                args.push(format!("--server-key={}", pki.server.1.display()));
                args.push(format!("--server-ca-cert={}", pki.ca.display()));
            }
        }
        match &self.options.token_auth {
            Some(t) => {
                args.push(format!("--agent-namespace={}", t.namespace));
                args.push(format!("--agent-service-account={}", t.service_account));
                args.push(format!("--authentication-audience={}", t.audience));
            }
            None => args.push(format!("--cluster-ca-cert={}", pki.ca.display())),
        }
        if self.options.token_auth.is_some()
            || self.options.server_args.iter().any(|a| a.starts_with("--enable-lease-controller"))
        {
            args.push(format!("--kubeconfig={}", self.kubeconfig.display()));
        }
        args.extend(self.options.server_args.iter().cloned());
        args
    }

    /// Starts another proxy-server (ours) in the control network, as server number `n` (2, 3, ...): agent port
    /// `8132 + 100 (n-1)`, admin and health ports next to it, TCP frontend off (no UDS either: only agents use
    /// it), the same agent authentication as the first, plus `extra` flags. Returns its agent port.
    pub fn start_extra_server(&mut self, n: u16, extra: &[String]) -> anyhow::Result<u16> {
        let base = AGENT_PORT + 100 * (n - 1);
        let mut args: Vec<String> = self
            .server_args()
            .into_iter()
            .filter(|a| {
                a != "--delete-existing-uds-file"
                    && ![
                        "--agent-port=",
                        "--admin-port=",
                        "--health-port=",
                        "--server-id=",
                        "--uds-name=",
                        "--server-port=",
                        "--server-bind-address=",
                        "--server-cert=",
                        "--server-key=",
                        "--server-ca-cert=",
                    ]
                    .iter()
                    .any(|p| a.starts_with(p))
            })
            .collect();
        args.extend([
            format!("--agent-port={base}"),
            format!("--admin-port={}", base + 1),
            format!("--health-port={}", base + 2),
            format!("--server-id=e2e-server-{n}"),
            format!("--uds-name={}", self.dir.path().join(format!("konnectivity-{n}.sock")).display()),
            "--server-port=0".into(),
            "--delete-existing-uds-file".into(),
        ]);
        args.extend(extra.iter().cloned());
        let bin = workspace_bin("proxy-server")?;
        let log = self.dir.path().join(format!("proxy-server-{n}.log"));
        self.extra_servers.push(self.control.spawn_process(
            &format!("proxy-server-{n}"),
            Command::new(bin).args(args),
            log,
        )?);
        Ok(base)
    }

    /// A metric of extra server `n` (see [`ControlPlane::start_extra_server`]).
    pub async fn extra_server_metric(&self, n: u16, name: &str) -> anyhow::Result<f64> {
        metric(&self.control, AGENT_PORT + 100 * (n - 1) + 1, name).await
    }

    /// A TCP load balancer in the control network on `CONTROL_LINK:port`, round robin over `backends` (ports on
    /// the control link address), as an operator would put in front of several proxy-servers.
    /// The returned list of backends may be changed while it runs.
    pub fn start_balancer(&mut self, port: u16, backends: Vec<u16>) -> anyhow::Result<Arc<Mutex<Vec<u16>>>> {
        let listener = self.control.listen(SocketAddr::from((CONTROL_LINK, port)))?;
        let next = Arc::new(AtomicUsize::new(0));
        let ns = self.control.clone();
        let backends = Arc::new(Mutex::new(backends));
        let list = backends.clone();
        self._servers.push(serve_listener(listener, move |mut client, _| {
            let backend = {
                let list = list.lock().unwrap_or_else(|e| e.into_inner());
                list.get(next.fetch_add(1, Ordering::SeqCst) % list.len().max(1)).copied()
            };
            let ns = ns.clone();
            async move {
                let Some(backend) = backend else { return };
                let addr = SocketAddr::from((CONTROL_LINK, backend));
                let Ok(mut upstream) = ns.connect(addr, Duration::from_secs(5)).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        })?);
        Ok(backends)
    }

    /// (Re)starts our proxy-server in the control network.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        let args = self.server_args();
        let bin = workspace_bin("proxy-server")?;
        self.server = Some(self.control.spawn_process(
            "proxy-server",
            Command::new(bin).args(args),
            self.dir.path().join("proxy-server.log"),
        )?);
        Ok(())
    }

    /// Starts the fixture's proxy-agent (when `Options::agent` was false, or after stopping it), with the
    /// fixture's flags, then `Options::agent_args`, then `extra`.
    pub async fn start_agent(&mut self, extra: &[String]) -> anyhow::Result<()> {
        let kubeconfig = self.dir.path().join("agent.kubeconfig");
        let token = match self.options.token_auth.clone() {
            Some(t) => {
                let token = self.create_token(&t.namespace, &t.service_account, &t.audience, 3600).await?;
                let path = self.dir.path().join("agent-token");
                std::fs::write(&path, token)?;
                Some(path)
            }
            None => None,
        };
        self.spawn_agent(&kubeconfig, token.as_deref(), extra)
    }

    fn spawn_agent(&mut self, kubeconfig: &Path, token: Option<&Path>, extra: &[String]) -> anyhow::Result<()> {
        let pki = &self.pki;
        let mut args = vec![format!("--ca-cert={}", pki.ca.display())];
        match token {
            Some(t) => args.push(format!("--service-account-token-path={}", t.display())),
            None => {
                args.push(format!("--agent-cert={}", pki.agent.0.display()));
                args.push(format!("--agent-key={}", pki.agent.1.display()));
            }
        }
        args.extend([
            format!("--proxy-server-host={CONTROL_LINK}"),
            format!("--proxy-server-port={AGENT_PORT}"),
            "--agent-id=e2e-agent-1".into(),
            format!("--agent-identifiers=host={NODE_NAME}&ipv4={NODE_IP}"),
            "--health-server-host=127.0.0.1".into(),
            format!("--health-server-port={AGENT_HEALTH_PORT}"),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-server-port={AGENT_ADMIN_PORT}"),
            "--sync-interval=200ms".into(),
            "--sync-interval-cap=1s".into(),
        ]);
        if self.options.agent_args.iter().chain(extra).any(|a| a.starts_with("--count-server-leases")) {
            args.push(format!("--kubeconfig={}", kubeconfig.display()));
        }
        // Flags given by the test replace the fixture's (the agent, like Go's flag package, takes one value).
        let name = |a: &String| a.split('=').next().unwrap_or_default().to_string();
        let overridden: Vec<String> = self.options.agent_args.iter().chain(extra).map(name).collect();
        args.retain(|a| !overridden.contains(&name(a)));
        args.extend(self.options.agent_args.iter().cloned());
        args.extend(extra.iter().cloned());
        let bin = workspace_bin("proxy-agent")?;
        self.agent = Some(self.cluster.spawn_process(
            "proxy-agent",
            Command::new(bin).args(args),
            self.dir.path().join("proxy-agent.log"),
        )?);
        Ok(())
    }

    async fn wait_kas_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = self.kas_request("GET", "/readyz", None).await {
                return Ok(());
            }
            self.etcd.check_alive()?;
            self.kas.check_alive()?;
            if Instant::now() > deadline {
                bail!("kube-apiserver not ready within {within:?}; log:\n{}", self.kas.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `GET path` on a plain-HTTP loopback port in `ns` answers 200.
    async fn wait_http(&self, ns: &NetNs, port: u16, path: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = plain_get(ns, port, path).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs = [&self.server, &self.agent]
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}:\n{}", p.name(), p.log_tail(20)))
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!("GET {path} on port {port} in {} not 200 within {within:?}\n{logs}", ns.name());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the server reports `n` ready agents.
    pub async fn wait_backends(&self, n: u64, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.server_metric("konnectivity_network_proxy_server_ready_backend_connections").await.ok();
            if got == Some(n as f64) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let agent = self.agent.as_ref().map(|a| a.log_tail(20)).unwrap_or_default();
                bail!("server has {got:?} agents, want {n}, after {within:?}; agent log:\n{agent}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of an unlabelled metric on proxy-server's admin port (sum over label sets).
    pub async fn server_metric(&self, name: &str) -> anyhow::Result<f64> {
        metric(&self.control, SERVER_ADMIN_PORT, name).await
    }

    /// The value of a metric on proxy-agent's health port, which serves /metrics (sum over label sets).
    pub async fn agent_metric(&self, name: &str) -> anyhow::Result<f64> {
        metric(&self.cluster, AGENT_HEALTH_PORT, name).await
    }

    /// One request to kube-apiserver as the administrator; returns status and body.
    pub async fn kas_request(
        &self,
        method: &str,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let resp = self.kas_send(method, path, json).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// One request to kube-apiserver as the administrator, returning the response as it streams.
    pub async fn kas_send(
        &self,
        method: &str,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> anyhow::Result<Response<Incoming>> {
        let tcp =
            self.control.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, KAS_PORT)), Duration::from_secs(5)).await?;
        let tls = tokio_rustls::TlsConnector::from(self.kas_client.clone())
            .connect(ServerName::IpAddress(IpAddr::from(Ipv4Addr::LOCALHOST).into()), tcp)
            .await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        let body = json.map(|j| Bytes::from(j.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, format!("127.0.0.1:{KAS_PORT}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, */*")
            .body(Full::new(body))?;
        Ok(sender.send_request(req).await?)
    }

    /// Creates an object (POST to `collection`), failing with the response unless it is 201 (or 409, exists).
    pub async fn create(&self, collection: &str, obj: serde_json::Value) -> anyhow::Result<()> {
        let (status, body) = self.kas_request("POST", collection, Some(&obj)).await?;
        if status != 201 && status != 409 {
            bail!("POST {collection}: {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }

    /// Runs kubectl in the control network with the admin kubeconfig; returns (success, stdout+stderr).
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<(bool, String)> {
        let mut cmd = Command::new(&self.bins.kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display())).args(args).stdin(Stdio::null());
        let out = self.control.run(|| cmd.output())??;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }

    /// A ServiceAccount token from the TokenRequest API.
    pub async fn create_token(&self, ns: &str, sa: &str, audience: &str, seconds: u64) -> anyhow::Result<String> {
        self.create(
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            serde_json::json!({
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}
            }),
        )
        .await?;
        let req = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": seconds}
        });
        let path = format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token");
        let (status, body) = self.kas_request("POST", &path, Some(&req)).await?;
        if status != 201 {
            bail!("POST {path}: {status}: {}", String::from_utf8_lossy(&body));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        v["status"]["token"].as_str().map(str::to_string).context("TokenRequest without a token")
    }

    async fn create_cluster_objects(&self) -> anyhow::Result<()> {
        use serde_json::json;
        self.create(
            "/api/v1/nodes",
            json!({
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME}
            }),
        )
        .await?;
        // Node status is the kubelet's to write; set the address and kubelet port as it would.
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": NODE_IP.to_string()}, {"type": "Hostname", "address": NODE_NAME}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}}
        }});
        let resp = self.kas_patch(&format!("/api/v1/nodes/{NODE_NAME}/status"), &status).await?;
        if resp.0 != 200 {
            bail!("patching node status: {}: {}", resp.0, String::from_utf8_lossy(&resp.1));
        }
        // kube-apiserver's service proxy only uses endpoint addresses that point at a Pod with that IP, so the
        // "pods" exist as objects too (bound to the node, status written as the kubelet would).
        self.create(
            "/api/v1/namespaces/default/serviceaccounts",
            json!({
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}
            }),
        )
        .await?;
        for (name, ip, port, target) in
            [("pod-svc", POD_IP, 80, POD_PORT), ("webhook", WEBHOOK_IP, WEBHOOK_PORT, WEBHOOK_PORT)]
        {
            let pod = format!("{name}-pod");
            self.create(
                "/api/v1/namespaces/default/pods",
                json!({
                    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "labels": {"app": name}},
                    "spec": {"nodeName": NODE_NAME, "automountServiceAccountToken": false,
                             "containers": [{"name": "main", "image": "konnectivity-rs.invalid/e2e:none"}]}
                }),
            )
            .await?;
            let status = json!({"status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                "conditions": [{"type": "Ready", "status": "True"}]}});
            let (code, body) =
                self.kas_patch(&format!("/api/v1/namespaces/default/pods/{pod}/status"), &status).await?;
            if code != 200 {
                bail!("patching pod {pod} status: {code}: {}", String::from_utf8_lossy(&body));
            }
            let target_ref = json!({"kind": "Pod", "namespace": "default", "name": pod});
            self.create(
                "/api/v1/namespaces/default/services",
                json!({
                    "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                    "spec": {"ports": [{"name": "main", "port": port, "targetPort": target, "protocol": "TCP"}]}
                }),
            )
            .await?;
            self.create("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": NODE_NAME, "targetRef": target_ref}],
                "ports": [{"name": "main", "port": target, "protocol": "TCP"}]
            }))
            .await?;
            // Endpoints too: some kube-apiserver paths still read them.
            self.create("/api/v1/namespaces/default/endpoints", json!({
                "apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": name},
                "subsets": [{"addresses": [{"ip": ip.to_string(), "nodeName": NODE_NAME, "targetRef": target_ref}], "ports": [{"name": "main", "port": target, "protocol": "TCP"}]}]
            }))
            .await?;
        }
        Ok(())
    }

    /// JSON merge patch.
    pub async fn kas_patch(&self, path: &str, patch: &serde_json::Value) -> anyhow::Result<(u16, Bytes)> {
        let tcp =
            self.control.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, KAS_PORT)), Duration::from_secs(5)).await?;
        let tls = tokio_rustls::TlsConnector::from(self.kas_client.clone())
            .connect(ServerName::IpAddress(IpAddr::from(Ipv4Addr::LOCALHOST).into()), tcp)
            .await?;
        let req = Request::builder()
            .method("PATCH")
            .uri(path)
            .header(http::header::HOST, format!("127.0.0.1:{KAS_PORT}"))
            .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
            .body(Full::new(Bytes::from(patch.to_string())))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        Ok((status, resp.into_body().collect().await?.to_bytes()))
    }

    /// Registers the e2e webhook (service reference, through the tunnel) for ConfigMaps labelled
    /// `konnectivity-e2e=webhook`: it denies those named `deny-*`.
    pub async fn register_webhook(&self) -> anyhow::Result<()> {
        use base64_engine::encode;
        let ca = std::fs::read(&self.pki.ca)?;
        self.create("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations", serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "konnectivity-e2e"},
            "webhooks": [{
                "name": "e2e.konnectivity-rs.test",
                "clientConfig": {
                    "service": {"namespace": "default", "name": "webhook", "port": WEBHOOK_PORT, "path": "/validate"},
                    "caBundle": encode(&ca)
                },
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["configmaps"]}],
                "objectSelector": {"matchLabels": {"konnectivity-e2e": "webhook"}},
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 10
            }]
        }))
        .await
    }

    /// Fails with the logs if the decoys in the control network were hit.
    pub fn assert_no_decoy_hits(&self) {
        let hits = self.counters.decoy_hits.load(Ordering::SeqCst);
        assert_eq!(hits, 0, "the decoys in the control network were hit {hits} times: traffic bypassed the tunnel");
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after 10 s), closing every connection it held through the tunnel
    /// (its HTTP clients keep idle connections to kubelets, pods and webhooks open). Returns whether it exited
    /// within the grace period.
    pub fn stop_kube_apiserver(&mut self) -> bool {
        self.kas.stop(Duration::from_secs(10))
    }

    /// Waits until server and agent hold no tunneled connection and no pending dial.
    pub async fn assert_settled(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let pending = self.server_metric("konnectivity_network_proxy_server_pending_backend_dials").await?;
            let established = self.server_metric("konnectivity_network_proxy_server_established_connections").await?;
            let endpoints = if self.agent.is_some() {
                self.agent_metric("konnectivity_network_proxy_agent_open_endpoint_connections").await?
            } else {
                0.0
            };
            if pending == 0.0 && established == 0.0 && endpoints == 0.0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not settled after {within:?}: pending dials {pending}, established {established}, agent endpoints {endpoints}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops everything in order (agent, server, kube-apiserver, etcd) and reports processes that needed
    /// SIGKILL.
    pub fn shutdown(mut self) -> Vec<String> {
        let mut slow = Vec::new();
        for p in
            [self.agent.as_mut(), self.server.as_mut(), Some(&mut self.kas), Some(&mut self.etcd)].into_iter().flatten()
        {
            if !p.stop(Duration::from_secs(10)) {
                slow.push(p.name().to_string());
            }
        }
        slow
    }
}

mod base64_engine {
    /// Standard base64 with padding (for caBundle).
    pub fn encode(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, identity: &(PathBuf, PathBuf)) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
         users:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\n\
         contexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: admin\ncurrent-context: e2e\n",
        ca.display(),
        identity.0.display(),
        identity.1.display()
    );
    std::fs::write(path, text)?;
    Ok(())
}

fn egress_config(mode: EgressMode, uds: &Path, pki: &ClusterPki) -> String {
    let (protocol, transport) = match mode {
        EgressMode::GrpcUds => ("GRPC", format!("      uds:\n        udsName: {}\n", uds.display())),
        EgressMode::ConnectUds => ("HTTPConnect", format!("      uds:\n        udsName: {}\n", uds.display())),
        EgressMode::ConnectMtls => (
            "HTTPConnect",
            format!(
                "      tcp:\n        url: https://127.0.0.1:{FRONTEND_PORT}\n        tlsConfig:\n          caBundle: {}\n          clientKey: {}\n          clientCert: {}\n",
                pki.ca.display(),
                pki.kas_egress_client.1.display(),
                pki.kas_egress_client.0.display()
            ),
        ),
    };
    format!(
        "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: {protocol}\n    transport:\n{transport}"
    )
}

/// `GET path` over plain HTTP on a loopback port inside `ns`.
pub async fn plain_get(ns: &NetNs, port: u16, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let tcp = ns.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(2)).await?;
    tokio::time::timeout(Duration::from_secs(5), crate::http::get(tcp, "127.0.0.1", path)).await?
}

/// Sum of all samples of metric `name` on a loopback admin port inside `ns`. `name` may carry one label
/// matcher, as in `foo_total{result="ok"}`: then only samples with that label are summed.
pub async fn metric(ns: &NetNs, port: u16, name: &str) -> anyhow::Result<f64> {
    let (name, label) = match name.split_once('{') {
        Some((n, l)) => (n, Some(l.trim_end_matches('}'))),
        None => (name, None),
    };
    let (status, body) = plain_get(ns, port, "/metrics").await?;
    if status != 200 {
        bail!("GET /metrics on {port}: {status}");
    }
    let text = String::from_utf8_lossy(&body);
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(label) = label
            && !rest.split(' ').next().unwrap_or_default().contains(label)
        {
            continue;
        }
        let value = rest.rsplit(' ').next().unwrap_or_default().parse::<f64>()?;
        *sum.get_or_insert(0.0) += value;
    }
    sum.with_context(|| format!("metric {name} not exported on port {port}"))
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<BoxBody> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r
}

/// Serves HTTP/1.1 on `listener`, over TLS when `tls` is given.
fn serve_http<F, Fut>(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: F,
) -> anyhow::Result<Target>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<BoxBody>, std::io::Error>> + Send + 'static,
{
    Ok(serve_listener(listener, move |tcp, _| {
        let handler = handler.clone();
        let tls = tls.clone();
        async move {
            let service = hyper::service::service_fn(handler);
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                Some(cfg) => {
                    if let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                }
            }
        }
    })?)
}

struct StreamGuard(Arc<Counters>);
impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.log_streams_open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn start_cluster_endpoints(cluster: &NetNs, pki: &ClusterPki, counters: &Arc<Counters>) -> anyhow::Result<Vec<Target>> {
    use konnectivity_transport::tls::{ClientAuth, server_config};
    let mut out = Vec::new();

    // The kubelet: HTTPS, client certificates required (as a kubelet does for kube-apiserver).
    let kubelet_tls =
        server_config(&pki.kubelet.0, &pki.kubelet.1, &ClientAuth::Require(pki.ca.clone()), &[b"http/1.1"])?;
    let c = counters.clone();
    out.push(serve_http(
        cluster.listen(SocketAddr::from((NODE_IP, KUBELET_PORT)))?,
        Some(kubelet_tls),
        move |req: Request<Incoming>| {
            let c = c.clone();
            async move {
                c.kubelet_requests.fetch_add(1, Ordering::SeqCst);
                let path = req.uri().path().to_string();
                let follow = req.uri().query().is_some_and(|q| q.contains("follow=true"));
                if path.starts_with("/containerLogs/") && follow {
                    // Like `kubectl logs -f`: a line every 100 ms until the reader goes away.
                    c.log_streams_open.fetch_add(1, Ordering::SeqCst);
                    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
                    let c2 = c.clone();
                    tokio::spawn(async move {
                        let _guard = StreamGuard(c2.clone());
                        let mut n = 0u64;
                        loop {
                            n += 1;
                            let line = format!("log line {n} from the kubelet at {NODE_IP}\n");
                            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                                return;
                            }
                            c2.log_lines.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    });
                    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
                    return Ok(Response::new(BodyExt::boxed(body)));
                }
                Ok(text(StatusCode::OK, format!("kubelet {NODE_NAME} at {NODE_IP} served {path}\n")))
            }
        },
    )?);

    // The pod: plain HTTP.
    let c = counters.clone();
    out.push(serve_http(
        cluster.listen(SocketAddr::from((POD_IP, POD_PORT)))?,
        None,
        move |req: Request<Incoming>| {
            let c = c.clone();
            async move {
                c.pod_requests.fetch_add(1, Ordering::SeqCst);
                Ok(text(StatusCode::OK, format!("pod at {POD_IP} served {}\n", req.uri().path())))
            }
        },
    )?);

    // The admission webhook: HTTPS, denies ConfigMaps named deny-*.
    let webhook_tls = server_config(&pki.webhook.0, &pki.webhook.1, &ClientAuth::None, &[b"http/1.1"])?;
    let c = counters.clone();
    out.push(serve_http(
        cluster.listen(SocketAddr::from((WEBHOOK_IP, WEBHOOK_PORT)))?,
        Some(webhook_tls),
        move |req: Request<Incoming>| {
            let c = c.clone();
            async move {
                let body = req.into_body().collect().await.map_err(std::io::Error::other)?.to_bytes();
                let Ok(review) = serde_json::from_slice::<serde_json::Value>(&body) else {
                    return Ok(text(StatusCode::BAD_REQUEST, "not an AdmissionReview"));
                };
                c.webhook_reviews.fetch_add(1, Ordering::SeqCst);
                let request = &review["request"];
                let name = request["name"].as_str().or(request["object"]["metadata"]["name"].as_str()).unwrap_or("");
                let allowed = !name.starts_with("deny");
                let answer = serde_json::json!({
                    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {
                        "uid": request["uid"], "allowed": allowed,
                        "status": {"code": if allowed { 200 } else { 403 },
                                   "message": format!("the e2e webhook at {WEBHOOK_IP} (reached through the tunnel) denies {name}")}
                    }
                });
                let mut r = text(StatusCode::OK, answer.to_string());
                r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                Ok(r)
            }
        },
    )?);
    Ok(out)
}
