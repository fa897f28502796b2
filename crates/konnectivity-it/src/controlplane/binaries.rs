//! Where the real binaries are: kube-apiserver, etcd and kubectl (built by `controlplane/build.sh`), and this
//! workspace's own.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

/// A binary `interop/build.sh` builds (the Go reference's proxy-server, proxy-agent and test client, and our Go
/// clients), in `interop/bin`.
pub fn interop_bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/bin").join(name);
    if !p.exists() {
        bail!("{} is missing: run interop/build.sh (scripts/test does)", p.display());
    }
    Ok(p)
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
