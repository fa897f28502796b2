//! Delay and random loss on a link, as `tc qdisc add dev X root netem delay D loss P%` would do, for kernels
//! without `sch_netem` (the development and CI machines have none): an iptables `NFQUEUE` rule hands each
//! outgoing packet of the interface to this process, which drops a fraction `loss` of them at once and lets the
//! others go `delay` after they arrived, in order.
//!
//! It speaks nfnetlink_queue directly over a netlink socket (no libnetfilter_queue), opened inside the namespace.
//! Only metadata is copied (no payload); GSO packets reach the queue already segmented (the queue does not ask for
//! GSO), so loss applies per wire packet, like netem's.

use super::fabric::Fabric;
use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};
use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// Counters of a running emulation.
#[derive(Debug, Default)]
pub struct NetemStats {
    /// Packets that reached the queue.
    pub seen: AtomicU64,
    /// Packets dropped on purpose.
    pub dropped: AtomicU64,
    /// Queue notifications the socket could not take (the packets still pass, late).
    pub overruns: AtomicU64,
}

/// A running emulation; [`Netem::stop`] (or drop) removes the rule and lets every held packet go.
pub struct Netem {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    rule: Vec<String>,
    ns: Arc<konnectivity_it::netns::NetNs>,
    /// Its counters.
    pub stats: Arc<NetemStats>,
}

fn message(kind: u16, flags: u16, queue: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id = queue number (big endian).
    let mut body = vec![0u8, 0u8];
    body.extend_from_slice(&queue.to_be_bytes());
    for (kind, payload) in attrs {
        body.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(payload);
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
    }
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port ID: the kernel
    m.extend(body);
    m
}

fn verdict(kind: u16, queue: u16, verdict: u32, id: u32) -> Vec<u8> {
    let mut hdr = verdict.to_be_bytes().to_vec();
    hdr.extend_from_slice(&id.to_be_bytes());
    message(kind, 0, queue, &[(NFQA_VERDICT_HDR, hdr)])
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a receive buffer into netlink messages: (type, whole message).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let (Some(len), Some(kind)) = (u32_at(buf, at), u16_at(buf, at + 4)) {
        let len = len as usize;
        if len < 16 || at + len > buf.len() {
            break;
        }
        out.push((kind, &buf[at..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// The packet ID of a NFQNL_MSG_PACKET message.
fn packet_id(msg: &[u8]) -> Option<u32> {
    let mut at = 20; // nlmsghdr + nfgenmsg
    while let (Some(len), Some(kind)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
        let len = len as usize;
        if len < 4 {
            return None;
        }
        if kind & 0x3fff == NFQA_PACKET_HDR {
            let id = msg.get(at + 4..at + 8)?;
            return Some(u32::from_be_bytes(id.try_into().ok()?));
        }
        at += (len + 3) & !3;
    }
    None
}

fn configure(sock: &Socket, queue: u16) -> anyhow::Result<()> {
    let mut params = 0xffffu32.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_META);
    let steps = [
        (NFQA_CFG_CMD, vec![NFQNL_CFG_CMD_BIND, 0, 0, 0]),
        (NFQA_CFG_PARAMS, params),
        (NFQA_CFG_QUEUE_MAXLEN, 65536u32.to_be_bytes().to_vec()),
    ];
    for (kind, payload) in steps {
        sock.send(&message(NFQNL_MSG_CONFIG, NLM_F_ACK, queue, &[(kind, payload)]))?;
        let mut buf = [0u8; 4096];
        let n = (&*sock).read(&mut buf).context("reading the nfnetlink acknowledgement")?;
        for (t, m) in messages(&buf[..n]) {
            if t == NLMSG_ERROR {
                let errno = u32_at(m, 16).map(|e| e as i32).unwrap_or(0);
                if errno != 0 {
                    bail!("nfnetlink_queue config attribute {kind}: {}", std::io::Error::from_raw_os_error(-errno));
                }
            }
        }
    }
    Ok(())
}

impl Netem {
    /// Delays by `delay` and drops a fraction `loss` of the packets leaving the fabric's cluster network through
    /// its veth (towards the server), with NFQUEUE queue `queue`.
    pub fn on_cluster_egress(fabric: &Fabric, queue: u16, delay: Duration, loss: f64) -> anyhow::Result<Self> {
        let ns = fabric.cluster.clone();
        let sock = ns.run(|| -> std::io::Result<Socket> {
            let s = Socket::new(
                Domain::from(libc::AF_NETLINK),
                Type::from(libc::SOCK_RAW),
                Some(Protocol::from(NETLINK_NETFILTER)),
            )?;
            s.set_recv_buffer_size(8 << 20)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })??;
        configure(&sock, queue).context("binding an NFQUEUE (needs nfnetlink_queue)")?;
        let rule: Vec<String> =
            ["OUTPUT", "-o", &fabric.veth_cluster, "-j", "NFQUEUE", "--queue-num", &queue.to_string()]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let mut add = vec!["-A".to_string()];
        add.extend(rule.iter().cloned());
        fabric.iptables(&ns, &add.iter().map(String::as_str).collect::<Vec<_>>())?;

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(NetemStats::default());
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::spawn(move || run(sock, queue, delay, loss, &s, &st));
        Ok(Self { stop, thread: Some(thread), rule, ns, stats })
    }

    /// Removes the rule and releases what is held.
    pub fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        // Once only: `stop` finishes, then drop comes here again.
        let Some(thread) = self.thread.take() else { return };
        let mut del = vec!["netns", "exec", self.ns.name(), "iptables", "-w", "-D"];
        del.extend(self.rule.iter().map(String::as_str));
        let _ = std::process::Command::new("ip").args(&del).output();
        self.stop.store(true, Ordering::SeqCst);
        let _ = thread.join();
    }
}

impl Drop for Netem {
    fn drop(&mut self) {
        self.finish();
    }
}

fn run(sock: Socket, queue: u16, delay: Duration, loss: f64, stop: &AtomicBool, stats: &NetemStats) {
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut last_id = None;
    let mut buf = vec![0u8; 1 << 16];
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let wait = held
            .front()
            .map(|(due, _)| due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(20))
            .clamp(Duration::from_micros(500), Duration::from_millis(20));
        let _ = sock.set_read_timeout(Some(wait));
        match (&sock).read(&mut buf) {
            Ok(n) => {
                let arrived = Instant::now();
                for (kind, m) in messages(&buf[..n]) {
                    if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                        continue;
                    }
                    let Some(id) = packet_id(m) else { continue };
                    stats.seen.fetch_add(1, Ordering::Relaxed);
                    last_id = Some(id);
                    if rand::random::<f64>() < loss {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        let _ = sock.send(&verdict(NFQNL_MSG_VERDICT, queue, NF_DROP, id));
                    } else {
                        held.push_back((arrived + delay, id));
                    }
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                stats.overruns.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => break,
        }
        // Everything due goes at once: a batch verdict accepts every packet up to that ID still queued.
        let now = Instant::now();
        let mut due = None;
        while let Some(&(at, id)) = held.front() {
            if at > now {
                break;
            }
            due = Some(id);
            held.pop_front();
        }
        if let Some(id) = due {
            let _ = sock.send(&verdict(NFQNL_MSG_VERDICT_BATCH, queue, NF_ACCEPT, id));
        }
    }
    // Let whatever is still held go (closing the socket would drop it).
    if let Some(id) = held.back().map(|(_, id)| *id).or(last_id) {
        let _ = sock.send(&verdict(NFQNL_MSG_VERDICT_BATCH, queue, NF_ACCEPT, id));
    }
}
