//! Who is on the other end of a frontend connection: the process behind a Unix socket (`SO_PEERCRED`), or the
//! address and certificate subject of an mTLS client.
//!
//! The subject is read from the certificate's DER with a small reader of our own (no X.509 crate): only the
//! `subject` Name is needed, and everything it reads is bounded by the certificate the TLS layer already
//! verified. It is parsed by the audit writer, off the traffic path.

use konnectivity_transport::listen::TlsConnectInfo;
use rustls::pki_types::CertificateDer;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::unix::UCred;

/// The client of one frontend connection.
#[derive(Debug, Clone)]
pub(crate) enum ClientIdentity {
    /// A Unix-socket client, with its credentials when the kernel gave them.
    Uds(Option<UCred>),
    /// An mTLS client over TCP.
    Tcp {
        /// Its address.
        addr: SocketAddr,
        /// Its certificate chain (leaf first), as the handshake verified it.
        certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    },
}

impl ClientIdentity {
    /// The client of an accepted Unix-socket connection.
    pub(crate) fn unix(stream: &tokio::net::UnixStream) -> Self {
        Self::Uds(stream.peer_cred().ok())
    }

    /// The client of an accepted mTLS connection.
    pub(crate) fn tls(info: &TlsConnectInfo) -> Self {
        Self::Tcp { addr: info.remote_addr, certs: info.peer_certs.clone() }
    }

    /// The client of a gRPC request, from the connect info tonic put in its extensions.
    pub(crate) fn of_request<T>(request: &tonic::Request<T>) -> Self {
        if let Some(info) = request.extensions().get::<TlsConnectInfo>() {
            return Self::tls(info);
        }
        let cred = request.extensions().get::<tonic::transport::server::UdsConnectInfo>().and_then(|i| i.peer_cred);
        Self::Uds(cred)
    }

    /// The verified certificate chain of an mTLS client (leaf first).
    pub(crate) fn certs(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Self::Tcp { certs: Some(certs), .. } => Some(certs.as_slice()),
            _ => None,
        }
    }

    /// `uds` or `tcp`.
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Self::Uds(_) => "uds",
            Self::Tcp { .. } => "tcp",
        }
    }

    /// The subject of the client certificate, formatted as Go's `pkix.Name.String()` does (RFC 2253 order:
    /// `CN=kube-apiserver,O=system:masters`); `None` without a certificate or if it does not parse.
    pub(crate) fn subject(&self) -> Option<String> {
        match self {
            Self::Tcp { certs: Some(certs), .. } => certs.first().and_then(|c| subject(c.as_ref())),
            _ => None,
        }
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uds(Some(cred)) => match cred.pid() {
                Some(pid) => write!(f, "unix(uid={},pid={pid})", cred.uid()),
                None => write!(f, "unix(uid={})", cred.uid()),
            },
            Self::Uds(None) => f.write_str("unix"),
            Self::Tcp { addr, .. } => write!(f, "{addr}"),
        }
    }
}

/// One DER element: its tag, its contents, and what follows it. `None` if it does not fit in `input` or uses a
/// form a certificate Name never needs (high tag numbers, indefinite or over-long lengths).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        (bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b)), rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The subject Name of a DER certificate, formatted as Go does.
fn subject(cert: &[u8]) -> Option<String> {
    let (SEQUENCE, cert, _) = tlv(cert)? else { return None };
    let (SEQUENCE, tbs, _) = tlv(cert)? else { return None };
    // version [0] EXPLICIT (optional), serialNumber, signature, issuer, validity, then subject.
    let (tag, _, mut rest) = tlv(tbs)?;
    if tag == 0xa0 {
        rest = tlv(rest)?.2;
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (SEQUENCE, name, _) = tlv(rest)? else { return None };
    format_name(name)
}

/// An RDNSequence, last RDN first (RFC 2253), attributes of one RDN joined by `+`.
fn format_name(mut rdns: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    while !rdns.is_empty() {
        let (SET, mut set, rest) = tlv(rdns)? else { return None };
        rdns = rest;
        let mut attributes = Vec::new();
        while !set.is_empty() {
            let (SEQUENCE, attribute, rest) = tlv(set)? else { return None };
            set = rest;
            let (OID, oid, value) = tlv(attribute)? else { return None };
            let (value_tag, value_bytes, _) = tlv(value)?;
            attributes.push(format!("{}={}", attribute_name(oid), attribute_value(value_tag, value_bytes, value)));
        }
        parts.push(attributes.join("+"));
    }
    parts.reverse();
    Some(parts.join(","))
}

fn attribute_name(oid: &[u8]) -> String {
    let short = match oid {
        [0x55, 0x04, 3] => "CN",
        [0x55, 0x04, 5] => "SERIALNUMBER",
        [0x55, 0x04, 6] => "C",
        [0x55, 0x04, 7] => "L",
        [0x55, 0x04, 8] => "ST",
        [0x55, 0x04, 9] => "STREET",
        [0x55, 0x04, 10] => "O",
        [0x55, 0x04, 11] => "OU",
        [0x55, 0x04, 17] => "POSTALCODE",
        _ => return dotted(oid),
    };
    short.to_string()
}

/// An OID in dotted-decimal form (`?` where it is malformed).
fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for &b in oid {
        acc = match acc.checked_mul(128) {
            Some(v) => v | u64::from(b & 0x7f),
            None => return "?".into(),
        };
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        }
    }
    if arcs.is_empty() {
        return "?".into();
    }
    arcs.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// A string attribute value, escaped as RFC 2253 requires; other types as `#` and the hex of their DER (as Go).
fn attribute_value(tag: u8, bytes: &[u8], der: &[u8]) -> String {
    let text = match tag {
        // UTF8String, PrintableString, IA5String, T61String
        0x0c | 0x13 | 0x16 | 0x14 => String::from_utf8_lossy(bytes).into_owned(),
        // BMPString: UTF-16BE
        0x1e => {
            let units: Vec<u16> = bytes.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            String::from_utf16_lossy(&units)
        }
        _ => {
            let len = tlv(der).map(|(_, _, rest)| der.len() - rest.len()).unwrap_or(der.len());
            return format!("#{}", der[..len].iter().map(|b| format!("{b:02x}")).collect::<String>());
        }
    };
    let mut out = String::with_capacity(text.len());
    let last = text.chars().count().saturating_sub(1);
    for (i, c) in text.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == ' ' || c == '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(contents.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(contents.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(contents);
        out
    }

    fn rdn(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        der(SET, &der(SEQUENCE, &[der(OID, oid), der(tag, value)].concat()))
    }

    /// A certificate shaped as X.509 v3 up to its subject (what follows is not read).
    fn certificate(subject_rdns: &[Vec<u8>]) -> Vec<u8> {
        let tbs = [
            der(0xa0, &der(0x02, &[2])),
            der(0x02, &[0x01, 0x23]),
            der(SEQUENCE, &der(OID, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02])),
            der(SEQUENCE, &rdn(&[0x55, 0x04, 3], 0x0c, b"issuer CA")),
            der(SEQUENCE, &[der(0x17, b"250101000000Z"), der(0x17, b"350101000000Z")].concat()),
            der(SEQUENCE, &subject_rdns.concat()),
            der(SEQUENCE, &[0x05, 0x00]),
        ]
        .concat();
        der(SEQUENCE, &[der(SEQUENCE, &tbs), der(SEQUENCE, &[]), der(0x03, &[0])].concat())
    }

    #[test]
    fn subject_in_go_order_with_escaping() {
        let cert = certificate(&[
            rdn(&[0x55, 0x04, 10], 0x13, b"system:masters"),
            rdn(&[0x55, 0x04, 11], 0x0c, b"a,b+c"),
            rdn(&[0x55, 0x04, 3], 0x0c, b"kube-apiserver"),
        ]);
        assert_eq!(subject(&cert).as_deref(), Some("CN=kube-apiserver,OU=a\\,b\\+c,O=system:masters"));
    }

    #[test]
    fn unknown_attribute_types_and_values() {
        let cert = certificate(&[
            // emailAddress 1.2.840.113549.1.9.1 as IA5String, then an INTEGER-valued attribute.
            rdn(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01], 0x16, b"ops@example.com"),
            rdn(&[0x55, 0x04, 99], 0x02, &[0x05]),
        ]);
        assert_eq!(subject(&cert).as_deref(), Some("2.5.4.99=#020105,1.2.840.113549.1.9.1=ops@example.com"));
    }

    #[test]
    fn garbage_and_truncation_give_none_not_a_panic() {
        let cert = certificate(&[rdn(&[0x55, 0x04, 3], 0x0c, b"kube-apiserver")]);
        for cut in 0..cert.len() {
            let _ = subject(&cert[..cut]);
        }
        assert_eq!(subject(&[]), None);
        assert_eq!(subject(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject(b"not a certificate"), None);
    }

    #[test]
    fn leading_and_trailing_spaces_are_escaped() {
        let cert = certificate(&[rdn(&[0x55, 0x04, 3], 0x0c, b" #x ")]);
        assert_eq!(subject(&cert).as_deref(), Some("CN=\\ #x\\ "));
    }
}
