//! A DNS server that knows no names: every query, over UDP or TCP, is answered NXDOMAIN. It is the only
//! resolver the reference suite's network namespace has, so a name lookup there fails fast and the same way
//! every time ("no such host"), and never reaches a real resolver.

use konnectivity_it::netns::NetNs;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How long one TCP client may take to send a query.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The server; it stops when dropped.
pub struct NxDomainDns {
    queries: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl NxDomainDns {
    /// Serves `addr` (UDP and TCP) inside `ns`, on the current tokio runtime.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        let udp = ns.run(|| -> std::io::Result<std::net::UdpSocket> {
            let socket = std::net::UdpSocket::bind(addr)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })??;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let tcp = ns.listen(addr)?;
        let (queries, stop) = (Arc::new(Mutex::new(Vec::new())), CancellationToken::new());
        tokio::spawn(stop.clone().run_until_cancelled_owned(serve_udp(udp, queries.clone())));
        tokio::spawn(serve_tcp(tcp, queries.clone(), stop.clone()));
        Ok(Self { queries, stop })
    }

    /// The names asked for so far (with the query type), in order.
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().map(|q| q.clone()).unwrap_or_default()
    }
}

impl Drop for NxDomainDns {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn record(queries: &Mutex<Vec<String>>, query: Option<String>) {
    if let (Some(q), Ok(mut all)) = (query, queries.lock()) {
        all.push(q);
    }
}

async fn serve_udp(socket: tokio::net::UdpSocket, queries: Arc<Mutex<Vec<String>>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        if let Some(reply) = nxdomain_reply(&buf[..n]) {
            record(&queries, reply.question);
            let _ = socket.send_to(&reply.message, from).await;
        }
    }
}

async fn serve_tcp(listener: tokio::net::TcpListener, queries: Arc<Mutex<Vec<String>>>, stop: CancellationToken) {
    while let Some(Ok((mut conn, _))) = stop.run_until_cancelled(listener.accept()).await {
        let (queries, stop) = (queries.clone(), stop.clone());
        tokio::spawn(async move {
            // RFC 1035 4.2.2: each message is preceded by its length, two bytes, network order.
            let exchange = async {
                loop {
                    let len = tokio::time::timeout(TCP_IDLE, conn.read_u16()).await.ok()?.ok()?;
                    let mut query = vec![0u8; usize::from(len)];
                    conn.read_exact(&mut query).await.ok()?;
                    let reply = nxdomain_reply(&query)?;
                    record(&queries, reply.question);
                    let len = u16::try_from(reply.message.len()).ok()?;
                    conn.write_all(&len.to_be_bytes()).await.ok()?;
                    conn.write_all(&reply.message).await.ok()?;
                }
            };
            let _: Option<Option<()>> = stop.run_until_cancelled(exchange).await;
        });
    }
}

/// The answer to one query message.
#[derive(Debug)]
struct Reply {
    message: Vec<u8>,
    /// "name TYPE" of the question, if the query had one well-formed question.
    question: Option<String>,
}

const HEADER: usize = 12;
const RCODE_FORMERR: u8 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// The reply to `query`: NXDOMAIN (authoritative, the question echoed) for a standard query with one
/// question, FORMERR or NOTIMP for anything else; `None` for what is not a query at all (too short to hold a
/// header, or itself a response), which gets no answer.
fn nxdomain_reply(query: &[u8]) -> Option<Reply> {
    let header = query.get(..HEADER)?;
    let (flags, qdcount) = (header[2], u16::from_be_bytes([header[4], header[5]]));
    if flags & 0x80 != 0 {
        return None; // QR set: a response, not a query
    }
    let opcode = (flags >> 3) & 0x0f;
    let question = (opcode == 0 && qdcount == 1).then(|| question_len(&query[HEADER..])).flatten();
    let rcode = match (opcode, question) {
        (0, Some(_)) => RCODE_NXDOMAIN,
        (0, None) => RCODE_FORMERR,
        _ => RCODE_NOTIMP,
    };
    let mut message = Vec::with_capacity(HEADER + question.unwrap_or(0));
    message.extend_from_slice(&header[..2]); // ID
    // QR, the query's opcode and RD, AA; RA, RCODE.
    message.push(0x80 | (flags & 0x78) | 0x04 | (flags & 0x01));
    message.push(0x80 | rcode);
    message.extend_from_slice(&[0, u8::from(question.is_some()), 0, 0, 0, 0, 0, 0]);
    let text = question.and_then(|len| {
        let q = &query[HEADER..HEADER + len];
        message.extend_from_slice(q);
        question_text(q)
    });
    Some(Reply { message, question: text })
}

/// The length of the question at the start of `section` (name, type, class), if it is well formed. A query's
/// name has no compression pointers.
fn question_len(section: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let len = usize::from(*section.get(at)?);
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        at += 1 + len;
        if at > 255 {
            return None;
        }
    }
    let end = at + 1 + 4;
    (end <= section.len()).then_some(end)
}

/// "name TYPE" of a well-formed question, as [`question_len`] measured it.
fn question_text(question: &[u8]) -> Option<String> {
    let mut labels = Vec::new();
    let mut at = 0;
    while let Some(&len) = question.get(at).filter(|&&l| l != 0) {
        let label = question.get(at + 1..at + 1 + usize::from(len))?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + usize::from(len);
    }
    let qtype = question.get(at + 1..at + 3).map(|t| u16::from_be_bytes([t[0], t[1]]))?;
    let qtype = match qtype {
        1 => "A".to_string(),
        28 => "AAAA".to_string(),
        other => format!("TYPE{other}"),
    };
    Some(format!("{}. {qtype}", labels.join(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]); // RD, one question, one additional (EDNS)
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]); // OPT record
        q
    }

    #[test]
    fn a_query_gets_an_authoritative_nxdomain_with_its_question_echoed() {
        let q = query(0xbeef, "thisdefinitelydoesnotexist.com", 28);
        let reply = nxdomain_reply(&q).expect("a reply");
        let m = &reply.message;
        assert_eq!(&m[..2], &[0xbe, 0xef]);
        assert_eq!(m[2], 0x85, "QR, AA and RD");
        assert_eq!(m[3] & 0x0f, RCODE_NXDOMAIN);
        assert_eq!(&m[4..12], &[0, 1, 0, 0, 0, 0, 0, 0], "one question, nothing else");
        assert_eq!(&m[12..], &q[12..q.len() - 11], "the question, without the OPT record");
        assert_eq!(reply.question.as_deref(), Some("thisdefinitelydoesnotexist.com. AAAA"));
    }

    #[test]
    fn malformed_messages_get_formerr_or_nothing_and_never_panic() {
        assert!(nxdomain_reply(&[0; 11]).is_none(), "shorter than a header");
        let mut response = query(1, "a.b", 1);
        response[2] |= 0x80;
        assert!(nxdomain_reply(&response).is_none(), "a response");
        let q = query(2, "a.b", 1);
        for cut in HEADER..q.len() - 11 {
            let reply = nxdomain_reply(&q[..cut]).expect("a reply");
            assert_eq!(reply.message[3] & 0x0f, RCODE_FORMERR, "cut at {cut}");
            assert_eq!(reply.message.len(), HEADER);
        }
        let mut pointer = query(3, "a.b", 1);
        pointer[HEADER] = 0xc0;
        assert_eq!(nxdomain_reply(&pointer).expect("a reply").message[3] & 0x0f, RCODE_FORMERR);
        let mut notify = query(4, "a.b", 1);
        notify[2] |= 4 << 3;
        assert_eq!(nxdomain_reply(&notify).expect("a reply").message[3] & 0x0f, RCODE_NOTIMP);
    }
}
