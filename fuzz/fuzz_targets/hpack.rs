//! Our HPACK decoder and the Unix-socket `:authority` rewriter (`AuthorityFix`) on arbitrary bytes: header
//! blocks fed in sequence to one decoder (its dynamic table carries over), Huffman strings, and a byte stream
//! (optionally after the HTTP/2 preface, as frames) read through `AuthorityFix` in arbitrary read sizes.
#![no_main]

use arbitrary::Arbitrary;
use konnectivity_transport::h2_authority::AuthorityFix;
use konnectivity_transport::h2_authority::hpack::{self, Decoder};
use libfuzzer_sys::fuzz_target;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What one header block may decode to, at most (RFC 7541 sizes: 32 + name + value per field).
const HEADER_LIST_LIMIT: usize = hpack::MAX_HEADER_LIST;

#[derive(Debug, Arbitrary)]
struct FrameSpec {
    kind: u8,
    flags: u8,
    stream: u8,
    payload: Vec<u8>,
    /// Declares a length other than the payload's.
    bad_length: Option<u16>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    blocks: Vec<Vec<u8>>,
    huffman: Vec<u8>,
    preface: bool,
    frames: Vec<FrameSpec>,
    tail: Vec<u8>,
    reads: Vec<u8>,
}

/// Hands out the input in the given read sizes; never waits.
struct Chunked {
    data: VecDeque<u8>,
    sizes: Vec<u8>,
    n: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let size = self.sizes.get(self.n % self.sizes.len().max(1)).map_or(4096, |s| usize::from(*s) * 16 + 1);
        self.n += 1;
        let take = size.min(buf.remaining()).min(self.data.len());
        let chunk: Vec<u8> = self.data.drain(..take).collect();
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

fn list_size(fields: &[hpack::Field]) -> usize {
    fields.iter().map(|(n, v)| 32 + n.len() + v.len()).sum()
}

fuzz_target!(|input: Input| {
    let mut decoder = Decoder::new(4096);
    for block in &input.blocks {
        if let Ok(fields) = decoder.decode(block) {
            let size = list_size(&fields);
            assert!(size <= HEADER_LIST_LIMIT, "a {}-byte block decoded to a {size}-byte header list", block.len());
        }
    }
    let mut out = Vec::new();
    if hpack::huffman_decode(&input.huffman, &mut out).is_ok() {
        assert!(out.len() <= input.huffman.len() * 8 / 5, "Huffman codes are at least 5 bits");
    }

    // A byte stream for AuthorityFix.
    let mut bytes = Vec::new();
    if input.preface {
        bytes.extend_from_slice(PREFACE);
    }
    let mut header_frames = 0;
    for f in &input.frames {
        // Mostly HEADERS and CONTINUATION, the frames AuthorityFix rewrites.
        let kind = match f.kind % 4 {
            0 | 1 => 0x1,
            2 => 0x9,
            _ => f.kind % 11,
        };
        if kind == 0x1 || kind == 0x9 {
            header_frames += 1;
        }
        let len = f.bad_length.map_or(f.payload.len(), usize::from);
        bytes.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, f.flags]);
        bytes.extend_from_slice(&u32::from(f.stream % 4).to_be_bytes());
        bytes.extend_from_slice(&f.payload);
    }
    bytes.extend_from_slice(&input.tail);
    let mut fix =
        AuthorityFix::new(Chunked { data: bytes.iter().copied().collect(), sizes: input.reads.clone(), n: 0 });
    let mut cx = Context::from_waker(Waker::noop());
    let mut output = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut fix).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
            Poll::Ready(Ok(())) => output.extend_from_slice(rb.filled()),
            Poll::Ready(Err(e)) => panic!("read error from an infallible source: {e}"),
            Poll::Pending => panic!("AuthorityFix waits on a source that never does"),
        }
    }
    // Re-encoding may expand a block (Huffman, indexes) but never beyond what a header list may hold.
    let bound = bytes.len() + header_frames * (HEADER_LIST_LIMIT + 9 * (HEADER_LIST_LIMIT / 16_384 + 2));
    assert!(output.len() <= bound, "{} bytes in, {} out", bytes.len(), output.len());
    if !bytes.starts_with(&PREFACE[..PREFACE.len().min(bytes.len())]) {
        assert_eq!(output, bytes, "a stream that is not HTTP/2 passes through untouched");
    }
});
