//! The fixture itself: both networks, etcd, kube-apiserver, proxy-server and proxy-agent as processes, waits
//! on their readiness and a clean shutdown.

use super::config_files::{egress_config, write_kubeconfig};
use super::endpoints::{start_cluster_endpoints, start_decoys};
use super::*;
use crate::netns::{NetNs, veth};
use crate::targets::{Target, serve_listener};
use anyhow::bail;
use konnectivity_testkit::{ChildProcess, TempDir};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    pub(super) kas_client: Arc<rustls::ClientConfig>,
    _servers: Vec<Target>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl ControlPlane {
    /// Builds the networks, starts etcd, kube-apiserver, proxy-server and (optionally) proxy-agent and the
    /// cluster endpoints, creates the Node, the Services with their EndpointSlices and the webhook
    /// configuration, and returns when kube-apiserver is ready and the server has the agent.
    /// Fails at once, saying why, without root or `ip`.
    pub async fn start(options: Options) -> anyhow::Result<Self> {
        crate::netns::available()?;
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
        let mut servers = start_decoys(&control, &counters)?;
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
        self.start_agent_from(workspace_bin("proxy-agent")?, extra).await
    }

    /// Like [`ControlPlane::start_agent`], with another agent binary (the reference's, [`super::interop_bin`]);
    /// `extra` must then hold only flags that binary knows.
    pub async fn start_agent_from(&mut self, bin: PathBuf, extra: &[String]) -> anyhow::Result<()> {
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
        self.spawn_agent(bin, &kubeconfig, token.as_deref(), extra)
    }

    fn spawn_agent(
        &mut self,
        bin: PathBuf,
        kubeconfig: &Path,
        token: Option<&Path>,
        extra: &[String],
    ) -> anyhow::Result<()> {
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
