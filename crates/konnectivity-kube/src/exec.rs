//! kubeconfig `exec` credential plugins (client.authentication.k8s.io ExecCredential), token form: the plugin
//! runs when a token is first needed and again when the one it gave expires, as client-go runs it.

use crate::KubeError;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A token without an `expirationTimestamp` is reused this long, then the plugin runs again (client-go keeps it
/// until a request is refused with 401; a bounded reuse gets the same effect without a refused request).
const NO_EXPIRY_REUSE: Duration = Duration::from_secs(600);
/// A token is renewed this long before it expires, so no request carries one that runs out on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// A plugin that has not answered in this long is a failure, not a hang of every API call.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// An exec credential plugin and the last token it gave.
pub struct ExecPlugin {
    api_version: String,
    command: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cached: Mutex<Option<(String, SystemTime)>>,
}

impl std::fmt::Debug for ExecPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecPlugin").field("command", &self.command).field("args", &self.args).finish()
    }
}

#[derive(serde::Deserialize)]
struct RawExec {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<RawEnv>,
}

#[derive(serde::Deserialize)]
struct RawEnv {
    name: String,
    value: String,
}

#[derive(serde::Deserialize)]
struct ExecCredential {
    #[serde(default)]
    status: Option<ExecStatus>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecStatus {
    #[serde(default)]
    token: String,
    #[serde(default)]
    expiration_timestamp: Option<String>,
    #[serde(default)]
    client_certificate_data: Option<String>,
}

impl ExecPlugin {
    /// The plugin a kubeconfig's `user.exec` describes; a relative command with a `/` is taken relative to the
    /// kubeconfig's directory `base`, a bare name is looked up in `PATH`.
    pub(crate) fn from_yaml(value: &serde_yaml_ng::Value, base: &Path) -> Result<Self, String> {
        let raw: RawExec = serde_yaml_ng::from_value(value.clone()).map_err(|e| format!("exec: {e}"))?;
        if raw.command.is_empty() {
            return Err("exec: no command".into());
        }
        let command = if raw.command.contains('/') && !Path::new(&raw.command).is_absolute() {
            base.join(&raw.command)
        } else {
            PathBuf::from(&raw.command)
        };
        let api_version =
            if raw.api_version.is_empty() { "client.authentication.k8s.io/v1".to_string() } else { raw.api_version };
        Ok(Self {
            api_version,
            command,
            args: raw.args,
            env: raw.env.into_iter().map(|e| (e.name, e.value)).collect(),
            cached: Mutex::new(None),
        })
    }

    /// The cached token, while it is valid.
    pub fn cached(&self) -> Option<String> {
        let cached = self.cached.lock().ok()?;
        let (token, until) = cached.as_ref()?;
        (*until > SystemTime::now()).then(|| token.clone())
    }

    /// The current token: the cached one while valid, else a fresh one from the plugin (which blocks while the
    /// plugin runs, up to 30 s: async callers use [`crate::Token::current`]).
    pub fn token(&self) -> Result<String, KubeError> {
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        let (token, until) = self.run()?;
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((token.clone(), until));
        }
        Ok(token)
    }

    fn run(&self) -> Result<(String, SystemTime), KubeError> {
        let fail =
            |what: String| KubeError::Config(format!("exec credential plugin {}: {what}", self.command.display()));
        let info = serde_json::json!({
            "apiVersion": self.api_version,
            "kind": "ExecCredential",
            "spec": {"interactive": false},
        });
        let mut child = std::process::Command::new(&self.command)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("KUBERNETES_EXEC_INFO", info.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("could not start: {e}")))?;
        let started = std::time::Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if started.elapsed() > PLUGIN_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!("no answer within {PLUGIN_TIMEOUT:?}")));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        let output = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(fail(format!("{}: {}", output.status, stderr.trim().chars().take(300).collect::<String>())));
        }
        let credential: ExecCredential =
            serde_json::from_slice(&output.stdout).map_err(|e| fail(format!("unreadable ExecCredential: {e}")))?;
        let status = credential.status.ok_or_else(|| fail("the ExecCredential has no status".into()))?;
        if status.client_certificate_data.is_some() {
            return Err(fail("client certificates from exec plugins are not supported; a token is".into()));
        }
        if status.token.is_empty() {
            return Err(fail("the ExecCredential has no token".into()));
        }
        let until = match status.expiration_timestamp.as_deref().filter(|s| !s.is_empty()) {
            Some(t) => crate::lease::parse_time(t)
                .ok_or_else(|| fail(format!("unreadable expirationTimestamp {t:?}")))?
                .checked_sub(EXPIRY_MARGIN)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            None => SystemTime::now() + NO_EXPIRY_REUSE,
        };
        Ok((status.token, until))
    }
}
