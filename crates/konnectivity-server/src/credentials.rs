//! What a peer's credential says about who it is: the names in a client certificate (its subject's common name,
//! its DNS and URI subject alternative names), as the frontend's allow-list and the agents' identities read them.

use rustls::pki_types::CertificateDer;

/// The names a certificate carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CertNames {
    /// The subject's (first) common name.
    pub(crate) common_name: Option<String>,
    /// Every common name of the subject, in order (a subject may carry several).
    pub(crate) common_names: Vec<String>,
    /// DNS subject alternative names.
    pub(crate) dns: Vec<String>,
    /// URI subject alternative names.
    pub(crate) uris: Vec<String>,
}

impl CertNames {
    /// The names of a DER certificate; `None` if it does not parse (the TLS layer verified it already, so that
    /// is not expected).
    pub(crate) fn of(der: &CertificateDer<'_>) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let common_names: Vec<String> =
            cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string).collect();
        let mut names = Self { common_name: common_names.first().cloned(), common_names, ..Self::default() };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.dns.push(d.to_string()),
                    GeneralName::URI(u) => names.uris.push(u.to_string()),
                    _ => {}
                }
            }
        }
        Some(names)
    }

    /// Every name, common name first.
    pub(crate) fn all(&self) -> impl Iterator<Item = &str> {
        self.common_name.iter().chain(&self.dns).chain(&self.uris).map(String::as_str)
    }
}

/// Which client certificates the mutual-TLS frontend admits beyond its CA's verdict (`--frontend-client-names`).
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientAllowList {
    names: Vec<String>,
}

impl ClientAllowList {
    /// Admits certificates carrying one of `names` (as common name or DNS/URI SAN); empty admits any.
    pub(crate) fn new(names: Vec<String>) -> Self {
        Self { names }
    }

    /// Whether the client whose verified chain is `certs` (leaf first) may use the frontend; `Err` says why not.
    pub(crate) fn admits(&self, certs: Option<&[CertificateDer<'static>]>) -> Result<(), String> {
        if self.names.is_empty() {
            return Ok(());
        }
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return Err("no client certificate".into());
        };
        let names = CertNames::of(leaf).ok_or("the client certificate does not parse")?;
        if names.all().any(|n| self.names.iter().any(|allowed| allowed == n)) {
            return Ok(());
        }
        let presented: Vec<&str> = names.all().collect();
        Err(format!("client certificate names {presented:?} are not in --frontend-client-names"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, sans: &[&str]) -> CertificateDer<'static> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().clone()
    }

    #[test]
    fn names_and_the_allow_list() {
        let c = cert("kube-apiserver-proxy-client", &["apiserver.example"]);
        let names = CertNames::of(&c).expect("names");
        assert_eq!(names.common_name.as_deref(), Some("kube-apiserver-proxy-client"));
        assert_eq!(names.dns, ["apiserver.example"]);
        assert!(ClientAllowList::default().admits(None).is_ok());
        let list = ClientAllowList::new(vec!["kube-apiserver-proxy-client".into()]);
        assert!(list.admits(Some(std::slice::from_ref(&c))).is_ok());
        let agent = cert("system:node:node-a", &["node-a"]);
        let refused = list.admits(Some(std::slice::from_ref(&agent))).expect_err("an agent's certificate");
        assert!(refused.contains("system:node:node-a"), "{refused}");
        assert!(list.admits(None).is_err());
        let by_san = ClientAllowList::new(vec!["apiserver.example".into()]);
        assert!(by_san.admits(Some(std::slice::from_ref(&c))).is_ok());
    }
}
