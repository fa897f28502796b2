//! Accepting the `:authority` that gRPC clients send over Unix sockets.
//!
//! grpc-go (and so kube-apiserver's konnectivity-client) sends the percent-encoded socket path as the HTTP/2
//! `:authority` of calls over a Unix socket, e.g. `%2Fetc%2Fkubernetes%2Fkonnectivity-server.socket`. The h2
//! crate under tonic refuses such a request with `RST_STREAM(PROTOCOL_ERROR)` (hyperium/h2#442, #487), so a
//! plain tonic server cannot serve kube-apiserver over UDS. [`AuthorityFix`] sits between the socket and h2:
//! it passes every frame through untouched except header blocks, which it decodes (tracking the client's HPACK
//! dynamic table) and re-encodes statelessly, replacing an `:authority` that is not a valid URI authority with
//! `localhost`. Nothing in this server reads the authority; it only has to be acceptable to h2.

// The HPACK decoder is this shim's alone; the fuzz targets reach it through the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod hpack;
#[cfg(not(feature = "fuzzing"))]
mod hpack;

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// h2's default SETTINGS_MAX_FRAME_SIZE: re-encoded blocks are split to fit it.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is not ours to fix: pass it on and let h2 refuse it.
const MAX_BLOCK: usize = 1 << 20;
/// The authority put in place of an invalid one.
const REPLACEMENT: &[u8] = b"localhost";

/// A server-side stream that fixes client `:authority` values for h2 (see the module docs).
pub struct AuthorityFix<S> {
    inner: S,
    /// Bytes read from `inner`, not yet processed.
    raw: BytesMut,
    /// Processed bytes waiting for the reader.
    out: VecDeque<Bytes>,
    /// How much of the client preface has been passed on.
    preface_seen: usize,
    decoder: hpack::Decoder,
    /// A header block waiting for its CONTINUATION frames.
    pending: Option<PendingBlock>,
    /// After something unexpected, bytes are passed through unchanged and h2 judges them.
    passthrough: bool,
    eof: bool,
    /// How much to read next: grows while reads fill it, shrinks when they do not, so an idle connection
    /// holds a small buffer and a busy one reads in large chunks.
    read_size: usize,
}

const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;

struct PendingBlock {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: BytesMut,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            raw: BytesMut::new(),
            out: VecDeque::new(),
            preface_seen: 0,
            // h2 advertises no SETTINGS_HEADER_TABLE_SIZE, so clients keep to the default 4096.
            decoder: hpack::Decoder::new(4096),
            pending: None,
            passthrough: false,
            eof: false,
            read_size: MIN_READ,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves every complete unit of `raw` to `out`.
    fn process(&mut self) {
        if self.passthrough {
            if !self.raw.is_empty() {
                let all = self.raw.split().freeze();
                self.out.push_back(all);
            }
            return;
        }
        if self.preface_seen < PREFACE.len() {
            let n = (PREFACE.len() - self.preface_seen).min(self.raw.len());
            if self.raw[..n] != PREFACE[self.preface_seen..self.preface_seen + n] {
                self.passthrough = true;
                return self.process();
            }
            self.preface_seen += n;
            let chunk = self.raw.split_to(n).freeze();
            self.out.push_back(chunk);
        }
        while self.preface_seen == PREFACE.len() && self.raw.len() >= FRAME_HEADER {
            let len = (usize::from(self.raw[0]) << 16) | (usize::from(self.raw[1]) << 8) | usize::from(self.raw[2]);
            if self.raw.len() < FRAME_HEADER + len {
                return;
            }
            let kind = self.raw[3];
            if kind != HEADERS && kind != CONTINUATION {
                if self.pending.is_some() {
                    // A frame between HEADERS and its CONTINUATION is a connection error; let h2 say so.
                    return self.give_up();
                }
                let frame = self.raw.split_to(FRAME_HEADER + len).freeze();
                self.out.push_back(frame);
                continue;
            }
            let frame = self.raw.split_to(FRAME_HEADER + len);
            if !self.header_frame(frame) {
                return self.process();
            }
        }
    }

    /// Handles a HEADERS or CONTINUATION frame; false if it had to give up.
    fn header_frame(&mut self, mut frame: BytesMut) -> bool {
        let original = frame.clone().freeze();
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        frame.advance(FRAME_HEADER);
        let mut payload = frame;
        if kind == HEADERS {
            if self.pending.is_some() {
                self.out.push_back(original);
                return self.fail();
            }
            if flags & PADDED != 0 {
                let Some(&pad) = payload.first() else { return self.keep_original(original) };
                let pad = usize::from(pad);
                if payload.len() < 1 + pad {
                    return self.keep_original(original);
                }
                payload.advance(1);
                payload.truncate(payload.len() - pad);
            }
            let priority = if flags & PRIORITY != 0 {
                if payload.len() < 5 {
                    return self.keep_original(original);
                }
                let mut p = [0u8; 5];
                p.copy_from_slice(&payload[..5]);
                payload.advance(5);
                Some(p)
            } else {
                None
            };
            self.pending = Some(PendingBlock { stream_id, flags, priority, fragment: payload });
        } else {
            match &mut self.pending {
                Some(p) if p.stream_id == stream_id && p.fragment.len() + payload.len() <= MAX_BLOCK => {
                    p.fragment.extend_from_slice(&payload)
                }
                _ => return self.keep_original(original),
            }
        }
        if flags & END_HEADERS == 0 {
            return true;
        }
        let Some(block) = self.pending.take() else { return true };
        let Ok(fields) = self.decoder.decode(&block.fragment) else {
            // h2 would fail to decode it too; it reports the compression error on the original bytes.
            return self.keep_original(original);
        };
        let headers: Vec<(Vec<u8>, Vec<u8>)> = fields
            .into_iter()
            .map(|(name, value)| {
                let value =
                    if name == b":authority" && !valid_authority(&value) { REPLACEMENT.to_vec() } else { value };
                (name, value)
            })
            .collect();
        self.emit(block.stream_id, block.flags & END_STREAM, block.priority, &encode(&headers));
        true
    }

    /// Writes a header block as HEADERS (+ CONTINUATION) frames no larger than h2 accepts.
    fn emit(&mut self, stream_id: u32, end_stream: u8, priority: Option<[u8; 5]>, block: &[u8]) {
        let mut first = true;
        let mut rest = block;
        loop {
            let room = if first && priority.is_some() { MAX_FRAME - 5 } else { MAX_FRAME };
            let take = rest.len().min(room);
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let last = rest.is_empty();
            let (kind, mut flags) = if first { (HEADERS, end_stream) } else { (CONTINUATION, 0) };
            if last {
                flags |= END_HEADERS;
            }
            let prio = if first { priority } else { None };
            if prio.is_some() {
                flags |= PRIORITY;
            }
            let len = chunk.len() + prio.map_or(0, |_| 5);
            let mut frame = BytesMut::with_capacity(FRAME_HEADER + len);
            frame.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            frame.extend_from_slice(&stream_id.to_be_bytes());
            if let Some(p) = prio {
                frame.extend_from_slice(&p);
            }
            frame.extend_from_slice(chunk);
            self.out.push_back(frame.freeze());
            first = false;
            if last {
                return;
            }
        }
    }

    fn keep_original(&mut self, original: Bytes) -> bool {
        self.out.push_back(original);
        self.fail()
    }

    fn fail(&mut self) -> bool {
        self.passthrough = true;
        self.pending = None;
        false
    }

    fn give_up(&mut self) {
        self.passthrough = true;
        if let Some(p) = self.pending.take() {
            // Pass on what we held back, as it came (minus framing we cannot restore exactly: h2 will refuse
            // the connection either way, which is the right outcome for an interleaved header block).
            let mut frame = BytesMut::new();
            let len = p.fragment.len();
            frame.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                HEADERS,
                p.flags & !PADDED & !PRIORITY,
            ]);
            frame.extend_from_slice(&p.stream_id.to_be_bytes());
            frame.extend_from_slice(&p.fragment);
            self.out.push_back(frame.freeze());
        }
        self.process();
    }
}

/// Whether h2 accepts this `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK-encodes headers statelessly: every field a literal without indexing and without Huffman coding, so the
/// server's decoder table is never touched.
fn encode(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum());
    for (name, value) in headers {
        out.push(0x00);
        encode_string(&mut out, name);
        encode_string(&mut out, value);
    }
    out
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    // Length as an HPACK integer with a 7-bit prefix (Huffman bit 0).
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128 + 128) as u8);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(front) = this.out.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    this.out.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.raw.reserve(this.read_size);
            let room = this.raw.capacity() - this.raw.len();
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.raw) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(n)) => n,
            };
            if n == room {
                this.read_size = (this.read_size * 2).min(MAX_READ);
            } else if n < this.read_size / 4 {
                this.read_size = (this.read_size / 2).max(MIN_READ);
            }
            if this.raw.is_empty() && this.out.is_empty() && n == 0 {
                // Nothing buffered: let an idle connection hold no buffer.
                this.raw = BytesMut::new();
            }
            if n == 0 {
                this.eof = true;
                // Whatever is left (a truncated frame) goes on as it is; h2 reports the truncation.
                this.passthrough = true;
            }
            this.process();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The socket's own connect info (peer credentials), as tonic gives it for a bare `UnixStream`.
impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::Connected::connect_info(self.get_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A literal with incremental indexing, new name (0x40), no Huffman.
    fn indexed_literal(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut v = vec![0x40];
        encode_string(&mut v, name);
        encode_string(&mut v, value);
        v
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.expect("write");
        drop(client);
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.expect("read");
        out
    }

    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
        let mut v = Vec::new();
        while bytes.len() >= FRAME_HEADER {
            let len = (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
            v.push((bytes[3], bytes[4], bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        v
    }

    #[tokio::test]
    async fn rewrites_percent_encoded_authority_and_keeps_the_rest() {
        let mut block1 = indexed_literal(b":authority", b"%2Ftmp%2Fkonnectivity.sock");
        block1.extend(indexed_literal(b":path", b"/ProxyService/Proxy"));
        block1.extend(indexed_literal(b"te", b"trailers"));
        // The second request refers to the client's dynamic table (index 62 = newest = "te: trailers",
        // 63 = ":path", 64 = ":authority"), as a real encoder would.
        let block2 = [0x80 | 64, 0x80 | 63, 0x80 | 62];
        let data = frame(0x0, 0, 1, b"grpc-bytes");
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, b"")); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &block1));
        input.extend(&data);
        // The second block split over HEADERS + CONTINUATION, with padding and priority on the HEADERS.
        let mut padded = vec![2u8];
        padded.extend([0, 0, 0, 0, 16]);
        padded.extend(&block2[..1]);
        padded.extend([0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &block2[1..]));

        let out = run(input).await;
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let got = frames(&out[PREFACE.len()..]);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[0].0, 0x4);
        let mut decoder = loona_hpack::Decoder::new();
        let h1 = decoder.decode(&got[1].2).expect("decodes");
        assert_eq!(h1[0], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(h1[1], (b":path".to_vec(), b"/ProxyService/Proxy".to_vec()));
        assert_eq!(got[2].2, b"grpc-bytes");
        let (kind, flags, payload) = &got[3];
        assert_eq!(*kind, HEADERS);
        assert_eq!(*flags, END_STREAM | END_HEADERS | PRIORITY);
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 16]);
        let h2 = decoder.decode(&payload[5..]).expect("decodes");
        assert_eq!(h2[0], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(h2[2], (b"te".to_vec(), b"trailers".to_vec()));
    }

    #[tokio::test]
    async fn valid_authorities_are_kept_and_large_blocks_split() {
        let big = vec![b'x'; 40_000];
        let mut block = indexed_literal(b":authority", b"localhost:8090");
        block.extend(indexed_literal(b"x-big", &big));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = run(input).await;
        let got = frames(&out[PREFACE.len()..]);
        assert!(got.len() >= 3 && got.iter().all(|f| f.2.len() <= MAX_FRAME));
        let whole: Vec<u8> = got.iter().flat_map(|f| f.2.clone()).collect();
        let headers = loona_hpack::Decoder::new().decode(&whole).expect("decodes");
        assert_eq!(headers[0].1, b"localhost:8090");
        assert_eq!(headers[1].1, big);
    }

    #[tokio::test]
    async fn garbage_passes_through_for_h2_to_refuse() {
        let input = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(run(input.clone()).await, input);
        let mut bad = PREFACE.to_vec();
        bad.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff]));
        assert_eq!(run(bad.clone()).await, bad);
    }
}
