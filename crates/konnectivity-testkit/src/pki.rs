//! Throwaway PKIs made with rcgen. [`Ca`] signs [`Leaf`] certificates of any shape; [`Pki`] is the set a loopback
//! server, agent and client use: one CA, and server, agent and client certificates signed by it, plus a second,
//! unrelated CA with its own client certificate (for "wrong CA" tests). [`SecretDir`] publishes files the way
//! kubelet mounts a Secret.

pub use rcgen::ExtendedKeyUsagePurpose;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};

/// Paths of the generated files.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate everything below chains to.
    pub ca: PathBuf,
    /// Server certificate (SANs: localhost, 127.0.0.1, ::1).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Agent client certificate.
    pub agent_cert: PathBuf,
    /// Agent key.
    pub agent_key: PathBuf,
    /// Frontend client certificate.
    pub client_cert: PathBuf,
    /// Frontend client key.
    pub client_key: PathBuf,
    /// A client certificate from an unrelated CA.
    pub rogue_cert: PathBuf,
    /// Its key.
    pub rogue_key: PathBuf,
}

impl Pki {
    /// Generates the PKI into `dir`.
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let root = Ca::new("konnectivity-rs test CA")?;
        let rogue_root = Ca::new("unrelated CA")?;
        let (server_cert, server_key) = root.write_leaf(dir, "server", &Leaf::server("proxy-server"))?;
        let (agent_cert, agent_key) = root.write_leaf(dir, "agent", &Leaf::client("proxy-agent"))?;
        let (client_cert, client_key) = root.write_leaf(dir, "client", &Leaf::client("kube-apiserver"))?;
        let (rogue_cert, rogue_key) = rogue_root.write_leaf(dir, "rogue", &Leaf::client("rogue"))?;
        Ok(Self {
            ca: root.write(dir, "ca")?,
            server_cert,
            server_key,
            agent_cert,
            agent_key,
            client_cert,
            client_key,
            rogue_cert,
            rogue_key,
        })
    }
}

/// A CA kept in memory, to sign certificates: the fixed sets ([`Pki`], the control plane's), and more after
/// start (rotations, expired or wrong-usage certificates).
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// What a leaf certificate from [`Ca::leaf`] looks like.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Common name.
    pub name: String,
    /// Organization (`O=`), which Kubernetes reads as a group.
    pub organization: Option<String>,
    /// Subject alternative names (DNS names or IP addresses).
    pub sans: Vec<String>,
    /// Its one extended key usage.
    pub usage: ExtendedKeyUsagePurpose,
    /// Serial number (rcgen picks a random one when `None`).
    pub serial: Option<u64>,
    /// Already expired (valid 2020-01-01 to 2021-01-01) instead of valid now.
    pub expired: bool,
}

impl Leaf {
    fn new(name: &str, usage: ExtendedKeyUsagePurpose) -> Self {
        Self {
            name: name.into(),
            organization: None,
            sans: ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec(),
            usage,
            serial: None,
            expired: false,
        }
    }
    /// A server certificate (serverAuth) for localhost, 127.0.0.1 and ::1.
    pub fn server(name: &str) -> Self {
        Self::new(name, ExtendedKeyUsagePurpose::ServerAuth)
    }
    /// A client certificate (clientAuth), with the SANs localhost, 127.0.0.1 and ::1.
    pub fn client(name: &str) -> Self {
        Self::new(name, ExtendedKeyUsagePurpose::ClientAuth)
    }
    /// With these subject alternative names instead.
    pub fn sans(mut self, sans: &[&str]) -> Self {
        self.sans = sans.iter().map(|s| s.to_string()).collect();
        self
    }
    /// With this organization.
    pub fn organization(mut self, organization: &str) -> Self {
        self.organization = Some(organization.into());
        self
    }
    /// With this serial number.
    pub fn serial(mut self, serial: u64) -> Self {
        self.serial = Some(serial);
        self
    }
    /// Expired.
    pub fn expired(mut self) -> Self {
        self.expired = true;
        self
    }
}

impl Ca {
    /// A new self-signed CA.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate (DER).
    pub fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// Writes the CA certificate to `dir/<stem>.crt`.
    pub fn write(&self, dir: &Path, stem: &str) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("{stem}.crt"));
        std::fs::write(&path, self.pem())?;
        Ok(path)
    }

    /// Signs a leaf certificate with a fresh key: (certificate PEM, key PEM).
    pub fn leaf(&self, leaf: &Leaf) -> Result<(String, String), rcgen::Error> {
        let mut params = CertificateParams::new(leaf.sans.clone())?;
        params.distinguished_name.push(DnType::CommonName, leaf.name.as_str());
        if let Some(o) = &leaf.organization {
            params.distinguished_name.push(DnType::OrganizationName, o.as_str());
        }
        params.extended_key_usages = vec![leaf.usage.clone()];
        if let Some(serial) = leaf.serial {
            params.serial_number = Some(serial.into());
        }
        if leaf.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a leaf certificate and writes it to `dir/<stem>.crt`, its key to `dir/<stem>.key`: (certificate
    /// path, key path).
    pub fn write_leaf(&self, dir: &Path, stem: &str, leaf: &Leaf) -> anyhow::Result<(PathBuf, PathBuf)> {
        let (cert, key) = self.leaf(leaf)?;
        let (cert_path, key_path) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, cert)?;
        std::fs::write(&key_path, key)?;
        Ok((cert_path, key_path))
    }
}

/// A directory laid out as kubelet mounts a Secret: each file is a symlink `name -> ..data/name`, and `..data` a
/// symlink to a timestamped directory that [`SecretDir::publish`] replaces atomically (a rename), so that readers
/// see either every old file or every new one.
pub struct SecretDir {
    dir: PathBuf,
    version: u32,
}

impl SecretDir {
    /// Creates the directory and publishes `files` (name, contents) as its first version.
    pub fn new(dir: &Path, files: &[(&str, &str)]) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut secret = Self { dir: dir.to_path_buf(), version: 0 };
        secret.publish(files)?;
        Ok(secret)
    }

    /// The path of a file in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Replaces every file at once with `files`; a name not listed keeps pointing into the new version (and is
    /// missing there).
    pub fn publish(&mut self, files: &[(&str, &str)]) -> std::io::Result<()> {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version))?;
        for (name, contents) in files {
            std::fs::write(self.dir.join(&version).join(name), contents)?;
            let link = self.dir.join(name);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
            }
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&version, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))
    }
}
