//! An HPACK (RFC 7541) decoder: just what [`super`] (the `:authority` shim) needs to follow a client's header blocks.
//!
//! Written for speed and for hostile input: no allocation per Huffman symbol, no hashing, every length and
//! index checked, errors instead of panics. The Huffman code is canonical, so the table below holds only the
//! code length of each symbol (RFC 7541 Appendix B); codes are derived from the lengths once.

use std::collections::VecDeque;
use std::sync::OnceLock;

/// Why a header block could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ended in the middle of a representation.
    #[error("truncated header block")]
    Truncated,
    /// An integer does not fit the limits we accept.
    #[error("integer overflow")]
    IntegerOverflow,
    /// An index points at no table entry (or is 0).
    #[error("invalid table index {0}")]
    BadIndex(usize),
    /// A Huffman string is malformed (bad padding, or the EOS symbol inside it).
    #[error("invalid Huffman string")]
    BadHuffman,
    /// A dynamic table size update above the allowed maximum.
    #[error("table size update above the maximum")]
    BadSizeUpdate,
    /// The block decodes to more than [`MAX_HEADER_LIST`] (a few bytes that index a large table entry many times).
    #[error("header list larger than {MAX_HEADER_LIST} bytes")]
    HeaderListTooLarge,
}

/// A header field: name and value.
pub type Field = (Vec<u8>, Vec<u8>);

/// Code length in bits of each Huffman symbol, 0..=255 and EOS (256).
#[rustfmt::skip]
const HUFFMAN_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
];

/// The static table (RFC 7541 Appendix A), index 1..=61.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Largest integer accepted (string lengths, indexes, sizes): far above any header we forward.
const MAX_INTEGER: usize = 1 << 24;

/// The largest header list one block may decode to, in RFC 7541 sizes (32 + name + value per field): four times
/// what hyper's server accepts (16 KiB), so nothing it would take is refused here.
pub const MAX_HEADER_LIST: usize = 64 * 1024;

/// Canonical-code decoding tables, by code length.
struct Canonical {
    first_code: [u32; 31],
    first_index: [u16; 31],
    count: [u16; 31],
    /// Symbols ordered by (code length, symbol).
    symbols: [u16; 257],
}

fn canonical() -> &'static Canonical {
    static TABLE: OnceLock<Canonical> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut c = Canonical { first_code: [0; 31], first_index: [0; 31], count: [0; 31], symbols: [0; 257] };
        for &len in &HUFFMAN_LENGTHS {
            c.count[usize::from(len)] += 1;
        }
        let (mut code, mut index) = (0u32, 0u16);
        for len in 1..=30 {
            c.first_code[len] = code;
            c.first_index[len] = index;
            code = (code + u32::from(c.count[len])) << 1;
            index += c.count[len];
        }
        let mut next = c.first_index;
        for len in 1..=30u8 {
            for (symbol, &l) in HUFFMAN_LENGTHS.iter().enumerate() {
                if l == len {
                    c.symbols[usize::from(next[usize::from(len)])] = symbol as u16;
                    next[usize::from(len)] += 1;
                }
            }
        }
        c
    })
}

/// Decodes a Huffman-coded string.
pub fn huffman_decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let table = canonical();
    let (mut acc, mut len) = (0u32, 0usize);
    // Whether every bit since the last symbol was 1 (valid padding is a prefix of EOS: all ones).
    let mut all_ones = true;
    for &byte in input {
        for shift in (0..8).rev() {
            let bit = u32::from((byte >> shift) & 1);
            acc = (acc << 1) | bit;
            len += 1;
            all_ones &= bit == 1;
            if len > 30 {
                return Err(HpackError::BadHuffman);
            }
            let offset = acc.wrapping_sub(table.first_code[len]);
            if offset < u32::from(table.count[len]) {
                let symbol = table.symbols[usize::from(table.first_index[len]) + offset as usize];
                if symbol == 256 {
                    return Err(HpackError::BadHuffman);
                }
                out.push(symbol as u8);
                (acc, len, all_ones) = (0, 0, true);
            }
        }
    }
    if len > 7 || !all_ones { Err(HpackError::BadHuffman) } else { Ok(()) }
}

/// A decoder for one direction of one connection: it follows the peer's dynamic table.
pub struct Decoder {
    dynamic: VecDeque<Field>,
    size: usize,
    max_size: usize,
    /// The most a size update may ask for (our SETTINGS_HEADER_TABLE_SIZE).
    allowed: usize,
}

impl Decoder {
    /// A decoder whose table may grow to `allowed` octets (the HTTP/2 default is 4096).
    pub fn new(allowed: usize) -> Self {
        Self { dynamic: VecDeque::new(), size: 0, max_size: allowed, allowed }
    }

    /// Decodes a complete header block into (name, value) pairs, updating the dynamic table.
    ///
    /// A block that would decode to more than [`MAX_HEADER_LIST`] is refused: every indexed field is a copy, so a
    /// few kilobytes that index one large table entry over and over would otherwise decode to gigabytes.
    pub fn decode(&mut self, mut block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        while let Some(&first) = block.first() {
            let field = if first & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                self.entry(index)?
            } else if first & 0x40 != 0 {
                let field = self.literal(&mut block, 6)?;
                self.insert(field.clone());
                field
            } else if first & 0x20 != 0 {
                let size = integer(&mut block, 5)?;
                if size > self.allowed {
                    return Err(HpackError::BadSizeUpdate);
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                self.literal(&mut block, 4)?
            };
            list_size += 32 + field.0.len() + field.1.len();
            if list_size > MAX_HEADER_LIST {
                return Err(HpackError::HeaderListTooLarge);
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn entry(&self, index: usize) -> Result<Field, HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            }
            _ => self.dynamic.get(index - 62).cloned().ok_or(HpackError::BadIndex(index)),
        }
    }

    fn literal(&self, block: &mut &[u8], prefix: u8) -> Result<Field, HpackError> {
        let index = integer(block, prefix)?;
        let name = if index == 0 { string(block)? } else { self.entry(index)?.0 };
        Ok((name, string(block)?))
    }

    fn insert(&mut self, field: Field) {
        let size = 32 + field.0.len() + field.1.len();
        self.evict(size);
        if size <= self.max_size {
            self.size += size;
            self.dynamic.push_front(field);
        }
    }

    /// Evicts until `incoming` more octets fit.
    fn evict(&mut self, incoming: usize) {
        while self.size + incoming > self.max_size {
            match self.dynamic.pop_back() {
                Some((n, v)) => self.size -= 32 + n.len() + v.len(),
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

/// Reads an integer with an N-bit prefix (RFC 7541 5.1).
fn integer(block: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, rest) = block.split_first().ok_or(HpackError::Truncated)?;
    *block = rest;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = block.split_first().ok_or(HpackError::Truncated)?;
        *block = rest;
        value += usize::from(byte & 0x7f) << shift;
        if value > MAX_INTEGER {
            return Err(HpackError::IntegerOverflow);
        }
        if byte & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
        // Continuation bytes of value 0 (0x80) add nothing but move the shift: without this limit a run of them
        // shifts past the width of usize (found by the `hpack` fuzz target). MAX_INTEGER needs 4 of them.
        if shift > 28 {
            return Err(HpackError::IntegerOverflow);
        }
    }
}

/// Reads a string literal (RFC 7541 5.2).
fn string(block: &mut &[u8]) -> Result<Vec<u8>, HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, 7)?;
    if block.len() < len {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = block.split_at(len);
    *block = rest;
    if !huffman {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::with_capacity(len * 8 / 5);
    huffman_decode(raw, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code of each symbol, from the canonical construction.
    fn codes() -> Vec<(u32, u8)> {
        let t = canonical();
        let mut codes = vec![(0u32, 0u8); 257];
        for len in 1..=30usize {
            for i in 0..usize::from(t.count[len]) {
                let symbol = usize::from(t.symbols[usize::from(t.first_index[len]) + i]);
                codes[symbol] = (t.first_code[len] + i as u32, len as u8);
            }
        }
        codes
    }

    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let codes = codes();
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &b in s {
            let (code, len) = codes[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
        }
        out
    }

    #[test]
    fn our_table_agrees_with_an_independent_decoder_for_every_symbol() {
        for symbol in 0..=255u8 {
            let encoded = huffman_encode(&[symbol, b'a', symbol]);
            let theirs = loona_hpack::huffman::HuffmanDecoder::new().decode(&encoded).expect("loona decodes");
            assert_eq!(theirs, [symbol, b'a', symbol], "symbol {symbol}");
            let mut ours = Vec::new();
            huffman_decode(&encoded, &mut ours).expect("we decode");
            assert_eq!(ours, [symbol, b'a', symbol]);
        }
        // The RFC's own example (C.4.1): "www.example.com".
        let mut out = Vec::new();
        huffman_decode(&[0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff], &mut out)
            .expect("decodes");
        assert_eq!(out, b"www.example.com");
    }

    #[test]
    fn static_table_agrees_with_an_independent_decoder() {
        for index in 1..=61u8 {
            let theirs = loona_hpack::Decoder::new().decode(&[0x80 | index]).expect("loona");
            let ours = Decoder::new(4096).decode(&[0x80 | index]).expect("ours");
            assert_eq!(ours, theirs, "index {index}");
        }
    }

    #[test]
    fn decodes_what_an_independent_encoder_writes_including_the_dynamic_table() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut ours = Decoder::new(4096);
        for round in 0..50 {
            let path = format!("/ProxyService/Proxy/{round}");
            let headers: Vec<(&[u8], &[u8])> = vec![
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.as_bytes()),
                (b":authority", b"%2Ftmp%2Fkonnectivity.sock"),
                (b"content-type", b"application/grpc"),
                (b"user-agent", b"grpc-go/1.81.1"),
                (b"te", b"trailers"),
            ];
            let block = encoder.encode(headers.iter().copied());
            let decoded = ours.decode(&block).expect("decodes");
            let want: Vec<(Vec<u8>, Vec<u8>)> = headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
            assert_eq!(decoded, want, "round {round}");
        }
    }

    #[test]
    fn rfc_examples_with_eviction() {
        // RFC 7541 C.3 (requests without Huffman) followed by C.5-style eviction with a 256-octet table.
        let mut d = Decoder::new(4096);
        let c31 = [
            0x82, 0x86, 0x84, 0x41, 0x0f, b'w', b'w', b'w', b'.', b'e', b'x', b'a', b'm', b'p', b'l', b'e', b'.', b'c',
            b'o', b'm',
        ];
        let f = d.decode(&c31).expect("C.3.1");
        assert_eq!(f[3], (b":authority".to_vec(), b"www.example.com".to_vec()));
        let c32 = [0x82, 0x86, 0x84, 0xbe, 0x58, 0x08, b'n', b'o', b'-', b'c', b'a', b'c', b'h', b'e'];
        let f = d.decode(&c32).expect("C.3.2");
        assert_eq!(f[3], (b":authority".to_vec(), b"www.example.com".to_vec()));
        assert_eq!(f[4], (b"cache-control".to_vec(), b"no-cache".to_vec()));
        // A size update to 0 empties the table; the old index is then invalid.
        assert_eq!(d.decode(&[0x20, 0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(Decoder::new(4096).decode(&[0x3f, 0xe2, 0x1f]), Err(HpackError::BadSizeUpdate));
    }

    #[test]
    fn hostile_input_gives_errors_not_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (seed % 40) as usize;
            let block: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = Decoder::new(4096).decode(&block);
            let mut out = Vec::new();
            let _ = huffman_decode(&block, &mut out);
        }
        assert_eq!(Decoder::new(4096).decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(Decoder::new(4096).decode(&[0x41, 0x85, 0xff]), Err(HpackError::Truncated));
        assert_eq!(Decoder::new(4096).decode(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0x0f]), Err(HpackError::IntegerOverflow));
        let mut out = Vec::new();
        assert_eq!(huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut out), Err(HpackError::BadHuffman));
    }

    /// Regression (found by the `hpack` fuzz target): an integer continued by zero-valued bytes (0x80) shifted
    /// past the width of usize and panicked in debug builds.
    #[test]
    fn zero_continuation_bytes_do_not_overflow_the_shift() {
        let mut block = vec![0xff];
        block.extend([0x80; 16]);
        block.push(0x00);
        assert_eq!(Decoder::new(4096).decode(&block), Err(HpackError::IntegerOverflow));
        // Four continuation bytes (what MAX_INTEGER needs) are still read.
        assert_eq!(Decoder::new(4096).decode(&[0xff, 0x80, 0x80, 0x80, 0x80, 0x00]), Err(HpackError::BadIndex(127)));
    }

    /// A few bytes that index one large dynamic-table entry many times are refused instead of decoding to a
    /// header list thousands of times their size (4 MiB from 6 KiB here).
    #[test]
    fn indexing_one_entry_over_and_over_is_bounded() {
        let mut block = vec![0x40, 0x01, b'x', 0x7f];
        let value = vec![b'v'; 2000];
        let mut len = value.len() - 127;
        while len >= 128 {
            block.push((len % 128 + 128) as u8);
            len /= 128;
        }
        block.push(len as u8);
        block.extend(&value);
        block.extend(std::iter::repeat_n(0x80 | 62, 2000));
        assert_eq!(Decoder::new(4096).decode(&block), Err(HpackError::HeaderListTooLarge));
        // Up to the limit it decodes.
        let fits = block.len() - 2000 + (MAX_HEADER_LIST / 2033 - 1);
        let fields = Decoder::new(4096).decode(&block[..fits]).expect("decodes");
        assert!(fields.len() > 30);
    }
}
