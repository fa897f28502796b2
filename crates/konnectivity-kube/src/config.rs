//! Where the API server is and how to authenticate to it: a kubeconfig file, or the in-cluster service account.

use crate::KubeError;
use base64::Engine;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A bearer token, given directly or read from a file at every request (projected tokens rotate).
#[derive(Clone)]
pub enum Token {
    /// A fixed token.
    Static(String),
    /// A file holding the token.
    File(PathBuf),
    /// An exec credential plugin that gives one.
    Exec(std::sync::Arc<crate::exec::ExecPlugin>),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::Static(_) => f.write_str("Token::Static(<redacted>)"),
            Token::File(p) => write!(f, "Token::File({})", p.display()),
            Token::Exec(plugin) => write!(f, "Token::Exec({plugin:?})"),
        }
    }
}

impl Token {
    /// The current token.
    pub fn read(&self) -> Result<String, KubeError> {
        match self {
            Token::Static(t) => Ok(t.clone()),
            Token::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_string())
                .map_err(|e| KubeError::Config(format!("reading token file {}: {e}", p.display()))),
            Token::Exec(plugin) => plugin.token(),
        }
    }

    /// The current token without blocking the async runtime: an exec plugin that has to run again runs on a
    /// blocking thread.
    pub async fn current(&self) -> Result<String, KubeError> {
        match self {
            Token::Exec(plugin) => match plugin.cached() {
                Some(token) => Ok(token),
                None => {
                    let plugin = plugin.clone();
                    tokio::task::spawn_blocking(move || plugin.token())
                        .await
                        .map_err(|e| KubeError::Config(format!("exec credential plugin: {e}")))?
                }
            },
            // A file read of a few hundred bytes, as often as requests are made.
            other => other.read(),
        }
    }
}

/// A resolved client configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `https://host:port` (no trailing slash).
    pub server: String,
    /// PEM CA bundle trusted for the server; `None` uses no roots (and so fails) unless the server's
    /// certificate is issued by one of them.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Bearer token.
    pub token: Option<Token>,
    /// TLS server name to verify instead of the server URL's host.
    pub tls_server_name: Option<String>,
    /// Where this came from, for messages.
    pub source: String,
}

/// The service account directory every pod gets.
pub const IN_CLUSTER_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl Config {
    /// A kubeconfig file when `path` is given (non-empty), else the in-cluster configuration.
    pub fn load(path: Option<&Path>) -> Result<Self, KubeError> {
        match path {
            Some(p) if !p.as_os_str().is_empty() => Self::from_kubeconfig(p),
            _ => Self::in_cluster(),
        }
    }

    /// The in-cluster configuration: `KUBERNETES_SERVICE_HOST`/`_PORT` and the pod's service account token and CA.
    pub fn in_cluster() -> Result<Self, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").unwrap_or_default();
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_default();
        if host.is_empty() || port.is_empty() {
            return Err(KubeError::Config(
                "no --kubeconfig given and not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset)".into(),
            ));
        }
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let dir = Path::new(IN_CLUSTER_DIR);
        let ca = dir.join("ca.crt");
        let ca_pem = std::fs::read(&ca).map_err(|e| KubeError::Config(format!("reading {}: {e}", ca.display())))?;
        Ok(Self {
            server: format!("https://{host}:{port}"),
            ca_pem: Some(ca_pem),
            identity: None,
            token: Some(Token::File(dir.join("token"))),
            tls_server_name: None,
            source: "in-cluster service account".into(),
        })
    }

    /// Reads a kubeconfig file (its current context). Supported credentials: client certificates, `token`,
    /// `tokenFile`. Exec and auth-provider plugins are refused with a clear error.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, KubeError> {
        let bad = |what: String| KubeError::Config(format!("kubeconfig {}: {what}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let raw: RawKubeconfig = serde_yaml_ng::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let context_name = raw
            .current_context
            .clone()
            .filter(|c| !c.is_empty())
            .or_else(|| (raw.contexts.len() == 1).then(|| raw.contexts[0].name.clone()))
            .ok_or_else(|| bad("no current-context".into()))?;
        let context = raw
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .ok_or_else(|| bad(format!("context {context_name:?} not found")))?;
        let cluster = raw
            .clusters
            .iter()
            .find(|c| c.name == context.context.cluster)
            .ok_or_else(|| bad(format!("cluster {:?} not found", context.context.cluster)))?;
        let user = match &context.context.user {
            Some(u) if !u.is_empty() => {
                Some(raw.users.iter().find(|x| &x.name == u).ok_or_else(|| bad(format!("user {u:?} not found")))?)
            }
            _ => None,
        };
        let c = &cluster.cluster;
        if c.insecure_skip_tls_verify == Some(true) {
            return Err(bad("insecure-skip-tls-verify is not supported: give the CA".into()));
        }
        let server = c.server.trim_end_matches('/').to_string();
        if !server.starts_with("https://") {
            return Err(bad(format!("server {server:?} is not an https:// URL")));
        }
        let ca_pem = data_or_file(base, c.certificate_authority_data.as_deref(), c.certificate_authority.as_deref())
            .map_err(bad)?;
        let mut config = Self {
            server,
            ca_pem,
            identity: None,
            token: None,
            tls_server_name: c.tls_server_name.clone().filter(|s| !s.is_empty()),
            source: format!("kubeconfig {} (context {context_name})", path.display()),
        };
        if let Some(user) = user {
            let u = &user.user;
            if u.auth_provider.is_some() {
                return Err(bad(format!("user {:?}: auth-provider credentials are not supported", user.name)));
            }
            let cert = data_or_file(base, u.client_certificate_data.as_deref(), u.client_certificate.as_deref())
                .map_err(bad)?;
            let key = data_or_file(base, u.client_key_data.as_deref(), u.client_key.as_deref()).map_err(bad)?;
            config.identity = match (cert, key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => return Err(bad(format!("user {:?}: a client certificate needs its key", user.name))),
            };
            config.token = match (&u.token, &u.token_file) {
                _ if u.exec.is_some() => {
                    let exec = u.exec.as_ref().map(|e| crate::exec::ExecPlugin::from_yaml(e, base));
                    exec.transpose().map_err(bad)?.map(|p| Token::Exec(std::sync::Arc::new(p)))
                }
                (Some(t), _) if !t.is_empty() => Some(Token::Static(t.clone())),
                (_, Some(f)) if !f.is_empty() => Some(Token::File(base.join(f))),
                _ => None,
            };
        }
        Ok(config)
    }

    /// Host and port of the server URL.
    pub fn host_port(&self) -> Result<(String, u16), KubeError> {
        let rest = self.server.trim_start_matches("https://");
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| KubeError::Config(format!("bad server {authority}")))?;
            (h.to_string(), after.strip_prefix(':').unwrap_or("443"))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (authority.to_string(), "443"),
            }
        };
        let port = port.parse().map_err(|_| KubeError::Config(format!("bad port in server {}", self.server)))?;
        if host.is_empty() {
            return Err(KubeError::Config(format!("no host in server {}", self.server)));
        }
        Ok((host, port))
    }
}

fn data_or_file(base: &Path, data: Option<&str>, file: Option<&str>) -> Result<Option<Vec<u8>>, String> {
    if let Some(d) = data.filter(|d| !d.is_empty()) {
        return base64::engine::general_purpose::STANDARD
            .decode(d.trim())
            .map(Some)
            .map_err(|e| format!("bad base64 data: {e}"));
    }
    match file.filter(|f| !f.is_empty()) {
        Some(f) => {
            let p = base.join(f);
            std::fs::read(&p).map(Some).map_err(|e| format!("reading {}: {e}", p.display()))
        }
        None => Ok(None),
    }
}

#[derive(Deserialize)]
struct RawKubeconfig {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(rename = "current-context")]
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: RawCluster,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawCluster {
    server: String,
    certificate_authority: Option<String>,
    certificate_authority_data: Option<String>,
    insecure_skip_tls_verify: Option<bool>,
    tls_server_name: Option<String>,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: RawUser,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
struct RawUser {
    client_certificate: Option<String>,
    client_certificate_data: Option<String>,
    client_key: Option<String>,
    client_key_data: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    exec: Option<serde_yaml_ng::Value>,
    auth_provider: Option<serde_yaml_ng::Value>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: RawContext,
}

#[derive(Deserialize)]
struct RawContext {
    cluster: String,
    user: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("kube-config-test-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    }

    #[test]
    fn reads_files_relative_to_the_kubeconfig_and_data_fields() {
        let d = tmp();
        write(&d, "ca.crt", "CA");
        let k = write(
            &d,
            "kc",
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://10.0.0.1:6443/\n    certificate-authority: ca.crt\n\
             users:\n- name: u\n  user:\n    client-certificate-data: Q0VSVA==\n    client-key-data: S0VZ\n\
             contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
        );
        let c = Config::from_kubeconfig(&k).expect("load");
        assert_eq!(c.server, "https://10.0.0.1:6443");
        assert_eq!(c.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert_eq!(c.identity, Some((b"CERT".to_vec(), b"KEY".to_vec())));
        assert_eq!(c.host_port().expect("hp"), ("10.0.0.1".to_string(), 6443));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn token_file_ipv6_and_refusals() {
        let d = tmp();
        write(&d, "tok", "abc\n");
        let k = write(
            &d,
            "kc",
            "clusters:\n- name: c\n  cluster:\n    server: https://[::1]:6443\n    certificate-authority-data: Q0E=\n\
             users:\n- name: u\n  user:\n    tokenFile: tok\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n",
        );
        let c = Config::from_kubeconfig(&k).expect("load");
        assert_eq!(c.token.as_ref().expect("token").read().expect("read"), "abc");
        assert_eq!(c.host_port().expect("hp"), ("::1".to_string(), 6443));

        let provider = write(
            &d,
            "provider",
            "clusters:\n- name: c\n  cluster:\n    server: https://h:1\n\
             users:\n- name: u\n  user:\n    auth-provider:\n      name: gcp\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
        );
        let e = Config::from_kubeconfig(&provider).expect_err("auth-provider refused").to_string();
        assert!(e.contains("auth-provider credentials are not supported"), "{e}");

        let http = write(
            &d,
            "http",
            "clusters:\n- name: c\n  cluster:\n    server: http://h:1\ncontexts:\n- name: x\n  context:\n    cluster: c\ncurrent-context: x\n",
        );
        let e = Config::from_kubeconfig(&http).expect_err("http refused").to_string();
        assert!(e.contains("is not an https:// URL"), "{e}");
        let e = Config::from_kubeconfig(&d.join("missing")).expect_err("missing").to_string();
        assert!(e.contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn exec_plugins_give_tokens_cached_until_they_expire() {
        use std::os::unix::fs::PermissionsExt;
        use std::time::SystemTime;
        let d = tmp();
        // The plugin counts its runs in a file and checks it was told what it is.
        let script = "#!/bin/sh\necho run >> \"$(dirname \"$0\")/runs\"\n\
            case \"$KUBERNETES_EXEC_INFO\" in *ExecCredential*) ;; *) exit 3;; esac\n\
            printf '{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\
            \"status\":{\"token\":\"%s\",\"expirationTimestamp\":\"%s\"}}' \"$1\" \"$2\"\n";
        let plugin = write(&d, "plugin.sh", script);
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let kubeconfig = |name: &str, expiry: &str| {
            write(
                &d,
                name,
                &format!(
                    "clusters:\n- name: c\n  cluster:\n    server: https://h:1\n\
                     users:\n- name: u\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n\
                     \x20     command: ./plugin.sh\n      args: [tok-{name}, \"{expiry}\"]\n\
                     contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n"
                ),
            )
        };
        let runs = || std::fs::read_to_string(d.join("runs")).map(|s| s.lines().count()).unwrap_or(0);
        let later = crate::lease::micro_time(SystemTime::now() + std::time::Duration::from_secs(3600));
        let c = Config::from_kubeconfig(&kubeconfig("a", &later)).expect("load");
        let token = c.token.as_ref().expect("token");
        assert_eq!(token.read().expect("read"), "tok-a");
        assert_eq!(token.read().expect("read"), "tok-a");
        assert_eq!(runs(), 1, "a valid token is reused");

        let soon = crate::lease::micro_time(SystemTime::now() + std::time::Duration::from_secs(5));
        let c = Config::from_kubeconfig(&kubeconfig("b", &soon)).expect("load");
        let token = c.token.as_ref().expect("token");
        assert_eq!(token.read().expect("read"), "tok-b");
        assert_eq!(token.read().expect("read"), "tok-b");
        assert_eq!(runs(), 3, "a token within the renewal margin is fetched again");
        // From async code the plugin runs on a blocking thread; a valid token is not fetched again.
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        assert_eq!(rt.block_on(token.current()).expect("current"), "tok-b");
        assert_eq!(runs(), 4, "fetched again, off the runtime");
        let c = Config::from_kubeconfig(&kubeconfig("d", &later)).expect("load");
        let token = c.token.as_ref().expect("token");
        assert_eq!(rt.block_on(token.current()).expect("current"), "tok-d");
        assert_eq!(rt.block_on(token.current()).expect("current"), "tok-d");
        assert_eq!(runs(), 5, "a valid token is reused from async code too");

        let c = Config::from_kubeconfig(&kubeconfig("c", "not a time")).expect("load");
        let e = c.token.as_ref().expect("token").read().expect_err("bad expiry").to_string();
        assert!(e.contains("unreadable expirationTimestamp"), "{e}");
        let missing = write(
            &d,
            "missing",
            "clusters:\n- name: c\n  cluster:\n    server: https://h:1\n\
             users:\n- name: u\n  user:\n    exec:\n      command: ./nope\n\
             contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
        );
        let c = Config::from_kubeconfig(&missing).expect("load");
        let e = c.token.as_ref().expect("token").read().expect_err("missing plugin").to_string();
        assert!(e.contains("could not start"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }
}
