//! kube-apiserver's `EgressSelectorConfiguration` file (`--egress-selector-config-file`), read as kube-apiserver
//! reads it, into the [`EgressDialer`] of one selection (usually `cluster`).
//!
//! Accepted, as in kube-apiserver: `apiVersion: apiserver.k8s.io/v1beta1` or `v1alpha1`, unknown fields refused,
//! selection names case-insensitive and not repeated, `master` taken as `controlplane`. Transports: `GRPC` over
//! `uds`, `HTTPConnect` over `uds`, `HTTPConnect` over `tcp` with an `https://` URL and mutual TLS. kube-apiserver
//! refuses `GRPC` over `tcp` and so do we; `Direct` (no proxy) and plain `http://` have nothing for this library to
//! do, and are refused with a message that says so.

use crate::address::ProxyAddress;
use crate::egress_dialer::EgressDialer;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The API group and versions kube-apiserver reads this kind in.
pub const API_VERSIONS: [&str; 2] = ["apiserver.k8s.io/v1beta1", "apiserver.k8s.io/v1alpha1"];

/// Why an egress selector configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EgressConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not YAML of the expected shape (an unknown field, a wrong type, …).
    #[error("parsing the egress selector configuration: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    /// Another kind or API version.
    #[error("{0}")]
    Kind(String),
    /// Valid for kube-apiserver perhaps, but not as asked: a name repeated or unknown, a transport missing.
    #[error("invalid egress selection: {0}")]
    Invalid(String),
    /// A form this library does not dial through (GRPC over TCP, Direct, plain HTTP).
    #[error("unsupported egress selection: {0}")]
    Unsupported(String),
}

fn invalid(msg: impl Into<String>) -> EgressConfigError {
    EgressConfigError::Invalid(msg.into())
}

fn unsupported(msg: impl Into<String>) -> EgressConfigError {
    EgressConfigError::Unsupported(msg.into())
}

/// The file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressSelectorConfiguration {
    /// `apiserver.k8s.io/v1beta1` (or `v1alpha1`).
    pub api_version: String,
    /// `EgressSelectorConfiguration`.
    pub kind: String,
    /// The selections.
    #[serde(default)]
    pub egress_selections: Vec<EgressSelection>,
}

/// One `egressSelections[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressSelection {
    /// `cluster`, `controlplane` (or its old name `master`) or `etcd`.
    pub name: String,
    /// How to connect.
    pub connection: Connection,
}

/// `connection`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Connection {
    /// `GRPC`, `HTTPConnect` or `Direct`.
    pub proxy_protocol: String,
    /// Where the proxy listens (none for `Direct`).
    #[serde(default)]
    pub transport: Option<Transport>,
}

/// `transport`: exactly one of `uds` and `tcp`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Transport {
    /// A Unix socket.
    #[serde(default)]
    pub uds: Option<UdsTransport>,
    /// TCP.
    #[serde(default)]
    pub tcp: Option<TcpTransport>,
}

/// `transport.uds`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UdsTransport {
    /// The socket's path (no `unix://`).
    pub uds_name: String,
}

/// `transport.tcp`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpTransport {
    /// `https://host:port` (only the host and port are used).
    pub url: String,
    /// The client's TLS files.
    #[serde(default)]
    pub tls_config: Option<TlsConfig>,
}

/// `transport.tcp.tlsConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// CA bundle (PEM file) for the server's certificate.
    #[serde(default)]
    pub ca_bundle: String,
    /// Client key (PEM file).
    #[serde(default)]
    pub client_key: String,
    /// Client certificate (PEM file).
    #[serde(default)]
    pub client_cert: String,
    /// Server name to verify instead of the URL's host.
    #[serde(default)]
    pub tls_server_name: String,
}

/// The canonical name of a selection: lower case, with `master` as `controlplane`.
fn canonical(name: &str) -> String {
    match name.to_ascii_lowercase().as_str() {
        "master" => "controlplane".into(),
        other => other.into(),
    }
}

impl EgressSelectorConfiguration {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, EgressConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| EgressConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text)
    }

    /// Parses and checks a configuration: kind, API version, selection names.
    pub fn parse(text: &str) -> Result<Self, EgressConfigError> {
        let config: Self = serde_yaml_ng::from_str(text)?;
        if config.kind != "EgressSelectorConfiguration" {
            return Err(EgressConfigError::Kind(format!("kind {:?}: want EgressSelectorConfiguration", config.kind)));
        }
        if !API_VERSIONS.contains(&config.api_version.as_str()) {
            return Err(EgressConfigError::Kind(format!(
                "apiVersion {:?}: want one of {}",
                config.api_version,
                API_VERSIONS.join(", ")
            )));
        }
        let mut seen = Vec::new();
        for selection in &config.egress_selections {
            let name = canonical(&selection.name);
            if !["cluster", "controlplane", "etcd"].contains(&name.as_str()) {
                return Err(invalid(format!("name {:?}: want cluster, controlplane or etcd", selection.name)));
            }
            if seen.contains(&name) {
                return Err(invalid(format!("name {name:?} is listed twice")));
            }
            seen.push(name);
        }
        Ok(config)
    }

    /// The selection called `name` (case-insensitive; `master` is `controlplane`).
    pub fn selection(&self, name: &str) -> Option<&EgressSelection> {
        let name = canonical(name);
        self.egress_selections.iter().find(|s| canonical(&s.name) == name)
    }

    /// The dialer of the `cluster` selection, the one that reaches nodes, pods and services.
    pub fn cluster_dialer(&self, user_agent: &str) -> Result<EgressDialer, EgressConfigError> {
        self.dialer("cluster", user_agent)
    }

    /// The dialer of the selection called `name`; `user_agent` is sent with HTTP CONNECT requests.
    pub fn dialer(&self, name: &str, user_agent: &str) -> Result<EgressDialer, EgressConfigError> {
        let selection = self.selection(name).ok_or_else(|| invalid(format!("no {name:?} selection in the file")))?;
        selection.connection.dialer(user_agent).map_err(|e| match e {
            EgressConfigError::Invalid(m) => invalid(format!("{name}: {m}")),
            EgressConfigError::Unsupported(m) => unsupported(format!("{name}: {m}")),
            other => other,
        })
    }
}

impl Connection {
    /// The dialer this connection describes.
    pub fn dialer(&self, user_agent: &str) -> Result<EgressDialer, EgressConfigError> {
        let transport = self.transport.clone().unwrap_or_default();
        match self.proxy_protocol.as_str() {
            "Direct" => {
                if self.transport.is_some() {
                    return Err(invalid("proxyProtocol Direct must have no transport"));
                }
                Err(unsupported("proxyProtocol Direct: connections do not go through a proxy-server"))
            }
            "GRPC" => match (transport.uds, transport.tcp) {
                (Some(uds), None) => Ok(EgressDialer::Grpc(uds_address(&uds)?)),
                (None, Some(_)) => Err(unsupported(
                    "proxyProtocol GRPC over tcp: kube-apiserver supports GRPC over uds only (\"UDS transport must \
                     be specified for GRPC\")",
                )),
                _ => Err(invalid("proxyProtocol GRPC needs a uds transport")),
            },
            "HTTPConnect" => {
                let proxy = match (transport.uds, transport.tcp) {
                    (Some(uds), None) => uds_address(&uds)?,
                    (None, Some(tcp)) => tcp_address(&tcp)?,
                    _ => return Err(invalid("proxyProtocol HTTPConnect needs exactly one of uds and tcp")),
                };
                Ok(EgressDialer::HttpConnect { proxy, user_agent: user_agent.to_string() })
            }
            other => Err(invalid(format!("proxyProtocol {other:?}: want GRPC, HTTPConnect or Direct"))),
        }
    }
}

fn uds_address(uds: &UdsTransport) -> Result<ProxyAddress, EgressConfigError> {
    if uds.uds_name.is_empty() {
        return Err(invalid("uds.udsName is empty"));
    }
    Ok(ProxyAddress::Uds(PathBuf::from(&uds.uds_name)))
}

fn tcp_address(tcp: &TcpTransport) -> Result<ProxyAddress, EgressConfigError> {
    let url = url::Url::parse(&tcp.url).map_err(|e| invalid(format!("tcp.url {:?}: {e}", tcp.url)))?;
    match url.scheme() {
        "https" => {}
        "http" => {
            return Err(unsupported(format!(
                "tcp.url {:?}: plain http (kube-apiserver's HTTPConnect dialer always uses TLS; use https)",
                tcp.url
            )));
        }
        other => return Err(invalid(format!("tcp.url {:?}: scheme {other:?}, want https", tcp.url))),
    }
    let host =
        url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| invalid(format!("tcp.url {:?}: no host", tcp.url)))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let tls = tcp.tls_config.clone().unwrap_or_default();
    if tls.client_cert.is_empty() || tls.client_key.is_empty() {
        return Err(invalid("an https tcp transport needs tlsConfig.clientCert and tlsConfig.clientKey"));
    }
    if tls.ca_bundle.is_empty() {
        return Err(unsupported(
            "tlsConfig without caBundle (kube-apiserver would use the system roots; give the proxy-server's CA)",
        ));
    }
    let address = ProxyAddress::tcp_mtls(
        host,
        port,
        Path::new(&tls.ca_bundle),
        Path::new(&tls.client_cert),
        Path::new(&tls.client_key),
    )
    .map_err(|e| invalid(format!("tlsConfig: {e}")))?;
    Ok(match address {
        ProxyAddress::Tcp { host, port, tls: config, .. } if !tls.tls_server_name.is_empty() => {
            ProxyAddress::Tcp { host, port, tls: config, server_name: Some(tls.tls_server_name) }
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(connection: &str) -> String {
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n\
             - name: Cluster\n  connection:\n{connection}\n- name: master\n  connection:\n    proxyProtocol: Direct\n"
        )
    }

    fn cluster(connection: &str) -> Result<EgressDialer, EgressConfigError> {
        EgressSelectorConfiguration::parse(&file(connection))?.cluster_dialer("test")
    }

    #[test]
    fn grpc_and_http_connect_over_uds() {
        let grpc =
            cluster("    proxyProtocol: GRPC\n    transport:\n      uds:\n        udsName: /run/k.sock").expect("grpc");
        assert!(matches!(&grpc, EgressDialer::Grpc(ProxyAddress::Uds(p)) if p == Path::new("/run/k.sock")));
        let connect = cluster("    proxyProtocol: HTTPConnect\n    transport:\n      uds: {udsName: /run/k.sock}")
            .expect("http connect");
        assert!(
            matches!(&connect, EgressDialer::HttpConnect { proxy: ProxyAddress::Uds(_), user_agent } if user_agent == "test")
        );
    }

    #[test]
    fn names_are_case_insensitive_and_master_is_controlplane() {
        let config = EgressSelectorConfiguration::parse(&file("    proxyProtocol: Direct")).expect("parse");
        assert!(config.selection("cluster").is_some());
        assert_eq!(config.selection("controlplane").map(|s| s.name.as_str()), Some("master"));
        assert!(config.selection("etcd").is_none());
        let err = config.dialer("etcd", "t").expect_err("missing");
        assert!(err.to_string().contains("no \"etcd\" selection"), "{err}");
    }

    #[test]
    fn refusals_say_why() {
        let cases = [
            ("    proxyProtocol: Direct", "Direct: connections do not go through a proxy-server"),
            ("    proxyProtocol: GRPC\n    transport:\n      tcp: {url: \"https://p:8090\"}", "GRPC over uds only"),
            ("    proxyProtocol: GRPC", "GRPC needs a uds transport"),
            ("    proxyProtocol: HTTPConnect", "exactly one of uds and tcp"),
            ("    proxyProtocol: Socks", "want GRPC, HTTPConnect or Direct"),
            ("    proxyProtocol: HTTPConnect\n    transport:\n      tcp: {url: \"http://p:8090\"}", "plain http"),
            ("    proxyProtocol: HTTPConnect\n    transport:\n      tcp: {url: \"https://p:8090\"}", "clientCert"),
            (
                "    proxyProtocol: HTTPConnect\n    transport:\n      tcp:\n        url: https://p:8090\n        \
                 tlsConfig: {clientCert: /c, clientKey: /k}",
                "without caBundle",
            ),
            (
                "    proxyProtocol: HTTPConnect\n    transport:\n      tcp:\n        url: https://p:8090\n        \
                 tlsConfig: {clientCert: /nonexistent/c, clientKey: /k, caBundle: /nonexistent/ca}",
                "tlsConfig:",
            ),
            ("    proxyProtocol: GRPC\n    transport:\n      uds: {udsName: /s, extra: 1}", "unknown field"),
        ];
        for (connection, want) in cases {
            let err = cluster(connection).expect_err(connection);
            assert!(err.to_string().contains(want), "{connection}: {err}");
        }
    }

    #[test]
    fn kind_version_and_names_are_checked() {
        let good = file("    proxyProtocol: Direct");
        for (from, to, want) in [
            ("apiserver.k8s.io/v1beta1", "apiserver.k8s.io/v1", "apiVersion"),
            ("apiserver.k8s.io/v1beta1", "apiserver.config.k8s.io/v1beta1", "apiVersion"),
            ("kind: EgressSelectorConfiguration", "kind: Egress", "kind"),
            ("name: master", "name: cluster", "listed twice"),
            ("name: master", "name: kubelet", "want cluster, controlplane or etcd"),
        ] {
            let err = EgressSelectorConfiguration::parse(&good.replace(from, to)).expect_err(to);
            assert!(err.to_string().contains(want), "{to}: {err}");
        }
        let v1alpha1 = good.replace("v1beta1", "v1alpha1");
        assert!(EgressSelectorConfiguration::parse(&v1alpha1).is_ok());
        let err = EgressSelectorConfiguration::load(Path::new("/nonexistent/egress.yaml")).expect_err("missing");
        assert!(err.to_string().contains("reading /nonexistent/egress.yaml"), "{err}");
    }
}
