//! Finds the server_name (SNI) in a TLS ClientHello without terminating TLS, so that sluice
//! can pick a backend from a connection's first bytes and then forward every byte untouched.
//! The parser is pure and incremental: handed every byte received so far, it answers
//! `Incomplete` until it can decide, and a decision never changes when more bytes arrive.

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// A valid prefix of a ClientHello: wait for more bytes.
    Incomplete,
    /// A complete ClientHello and its host name, lowercased; None when it names no host.
    Done(Option<String>),
}

/// Why the first bytes of a connection cannot be routed by SNI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The first record is not a TLS 3.x handshake record (plain HTTP, SSLv2, garbage).
    #[error("not a TLS handshake")]
    NotTls,
    /// The bytes start as TLS but break the record or ClientHello format; the text says where.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// Completing the ClientHello would take more than `max_len` bytes.
    #[error("ClientHello larger than the limit")]
    TooLarge,
}

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_NAME: usize = 0;
const HOST_NAME: u8 = 0;
const RECORD_HEADER: usize = 5;
const MESSAGE_HEADER: usize = 4;
/// RFC 8446 5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD: usize = 1 << 14;

/// Finds the host name in the ClientHello that `buf` (all bytes received so far) starts with.
pub fn server_name(buf: &[u8], max_len: usize) -> Result<Peek, Error> {
    // Bytes past the limit are never looked at, so no answer depends on them.
    let seen = buf.get(..max_len).unwrap_or(buf);
    let hs = reassemble(seen);
    match parse_hello(&hs, max_len) {
        Ok(name) => Ok(Peek::Done(name)),
        Err(Stop::Bad(e)) => Err(e),
        // The message bytes ran out: what stopped the record layer is next in the stream.
        Err(Stop::Short) => match hs.cut {
            Some(e) => Err(e),
            None if buf.len() >= max_len => Err(Error::TooLarge),
            None => Ok(Peek::Incomplete),
        },
    }
}

/// The handshake bytes collected from consecutive records, in stream order.
#[derive(Default)]
struct Handshake {
    bytes: Vec<u8>,
    /// (stream offset of the payload, declared payload length) of each record read.
    records: Vec<(usize, usize)>,
    /// The record-layer error that stopped collection; it comes after every collected byte.
    cut: Option<Error>,
}

/// Collects handshake payload from records until the message is complete, the bytes run
/// out, or a record header is bad. Records after the ClientHello (e.g. 0-RTT data) are
/// never looked at.
fn reassemble(seen: &[u8]) -> Handshake {
    let mut hs = Handshake::default();
    let mut c = Cursor::new(seen, usize::MAX);
    while hs.message_len().is_none_or(|total| hs.bytes.len() < total) {
        let len = match record_header(&mut c, hs.records.is_empty()) {
            Ok(len) => len,
            Err(Stop::Short) => break,
            Err(Stop::Bad(e)) => {
                hs.cut = Some(e);
                break;
            }
        };
        hs.records.push((c.pos, len));
        let payload = c.take_some(len);
        hs.bytes.extend_from_slice(payload);
        if payload.len() < len {
            break;
        }
    }
    hs
}

/// Checks one record header and returns its payload length. Each byte is judged as soon as
/// it is in, so plain HTTP is rejected on its first byte.
fn record_header(c: &mut Cursor, first: bool) -> Result<usize, Stop> {
    let reject = |what| {
        if first {
            Error::NotTls
        } else {
            Error::Malformed(what)
        }
    };
    // The cursor has no end here, so the overrun texts are never used.
    if c.int(1, "")? != usize::from(HANDSHAKE) {
        return Err(reject("non-handshake record inside the hello").into());
    }
    if c.int(1, "")? != 3 {
        return Err(reject("record version not 3.x").into());
    }
    c.take(1, "")?; // minor version: clients send 3.1 to 3.3 here
    let len = c.int(2, "")?;
    if len == 0 || len > MAX_RECORD {
        return Err(Error::Malformed("record length 0 or over 16384").into());
    }
    Ok(len)
}

impl Handshake {
    /// The full length of the handshake message, once its 4-byte header is in.
    fn message_len(&self) -> Option<usize> {
        let mut c = Cursor::new(&self.bytes, MESSAGE_HEADER);
        c.take(1, "").ok()?;
        Some(MESSAGE_HEADER + c.int(3, "").ok()?)
    }

    /// The fewest stream bytes that can complete a message of `total` bytes. Only records up
    /// to the one holding the message header count, so the bound is fixed once that header is
    /// in; later records are assumed full-sized.
    fn bytes_needed(&self, total: usize) -> usize {
        let mut covered = 0;
        for &(start, len) in &self.records {
            covered += len;
            if covered >= MESSAGE_HEADER {
                let end = start + len;
                if covered >= total {
                    return end - (covered - total);
                }
                let rest = total - covered;
                return end + rest + RECORD_HEADER * rest.div_ceil(MAX_RECORD);
            }
        }
        0
    }
}

/// Parses the ClientHello in the collected handshake bytes in stream order: each field is
/// judged as soon as it is in, and running out of bytes is `Stop::Short`.
fn parse_hello(hs: &Handshake, max_len: usize) -> Result<Option<String>, Stop> {
    let mut c = Cursor::new(&hs.bytes, MESSAGE_HEADER);
    if c.int(1, "")? != usize::from(CLIENT_HELLO) {
        return Err(Error::Malformed("handshake message is not a ClientHello").into());
    }
    let total = MESSAGE_HEADER + c.int(3, "")?;
    if hs.bytes_needed(total) > max_len {
        return Err(Error::TooLarge.into());
    }
    let mut c = Cursor { end: total, ..c };
    c.take(2 + 32, "random overruns the message")?; // legacy_version, random
    let session_id = c.int(1, "session_id overruns the message")?;
    if session_id > 32 {
        return Err(Error::Malformed("session_id longer than 32 bytes").into());
    }
    c.take(session_id, "session_id overruns the message")?;
    let suites = c.int(2, "cipher_suites overrun the message")?;
    if suites < 2 || suites % 2 != 0 {
        return Err(Error::Malformed("cipher_suites length odd or 0").into());
    }
    c.take(suites, "cipher_suites overrun the message")?;
    let compressions = c.int(1, "compression_methods overrun the message")?;
    if compressions == 0 {
        return Err(Error::Malformed("no compression method").into());
    }
    c.take(compressions, "compression_methods overrun the message")?;
    if c.pos == total {
        return Ok(None); // extensions are optional
    }
    if c.int(2, "extensions overrun the message")? != total - c.pos {
        return Err(Error::Malformed("extensions length mismatch").into());
    }
    let (mut name, mut seen_sni) = (None, false);
    while c.pos < total {
        let kind = c.int(2, "extension overruns the message")?;
        let len = c.int(2, "extension overruns the message")?;
        let data = c.take(len, "extension overruns the message")?;
        if kind == SERVER_NAME {
            if seen_sni {
                return Err(Error::Malformed("duplicate server_name").into());
            }
            seen_sni = true;
            name = parse_server_name(data)?;
        }
    }
    Ok(name)
}

/// Returns the first host_name in a server_name extension (RFC 6066 3), skipping other types.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, Stop> {
    let mut c = Cursor::new(data, data.len());
    let list = c.int(2, "server_name list overruns the extension")?;
    if list == 0 || list != data.len() - c.pos {
        return Err(Error::Malformed("bad server_name list length").into());
    }
    let mut found = None;
    while c.pos < data.len() {
        let kind = c.int(1, "server_name entry overrun")?;
        let len = c.int(2, "server_name entry overrun")?;
        let name = c.take(len, "server_name entry overrun")?;
        if kind == usize::from(HOST_NAME) && found.is_none() {
            found = Some(host_name(name)?);
        }
    }
    Ok(found)
}

/// Validates a host name (one trailing dot allowed) and returns it lowercased without the dot.
/// `_` is accepted because real internal names carry it.
fn host_name(raw: &[u8]) -> Result<String, Error> {
    let name = raw.strip_suffix(b".").unwrap_or(raw);
    let label_ok = |label: &[u8]| {
        !label.is_empty()
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split(|&b| b == b'.').all(label_ok) {
        return Err(Error::Malformed("invalid host name"));
    }
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// Why parsing stopped before an answer.
enum Stop {
    /// The bytes received so far end before the field being read.
    Short,
    /// The input is bad.
    Bad(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Bad(e)
    }
}

/// Reads fields from `buf`, which may hold only a prefix of a structure declared to end at
/// `end`: a field past `end` is malformed, a field past the received bytes is `Short`.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], end: usize) -> Self {
        Cursor { buf, pos: 0, end }
    }

    fn take(&mut self, n: usize, overrun: &'static str) -> Result<&'a [u8], Stop> {
        let stop = self.pos.saturating_add(n);
        if stop > self.end {
            return Err(Error::Malformed(overrun).into());
        }
        let field = self.buf.get(self.pos..stop).ok_or(Stop::Short)?;
        self.pos = stop;
        Ok(field)
    }

    /// Takes up to `n` bytes, as many as have arrived.
    fn take_some(&mut self, n: usize) -> &'a [u8] {
        let stop = self.pos.saturating_add(n).min(self.buf.len());
        let field = self.buf.get(self.pos..stop).unwrap_or_default();
        self.pos = stop;
        field
    }

    /// Reads an `n`-byte big-endian integer.
    fn int(&mut self, n: usize, overrun: &'static str) -> Result<usize, Stop> {
        let bytes = self.take(n, overrun)?;
        Ok(bytes.iter().fold(0, |acc, &b| acc << 8 | usize::from(b)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// `openssl s_client -connect 127.0.0.1:PORT -servername example.com` (OpenSSL 3.0.19),
    /// as a loopback listener received it.
    const OPENSSL: &str = concat!(
        "1603010138010001340303498a2725f575888ead750f5a68d604df55a0803f7a13724411aff19baf5eef8220",
        "5b4b48a19701cf7fa80947512689fee2630f81561710e8026fcde475cb98e24a003e130213031301c02cc030",
        "009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d",
        "003c0035002f00ff010000ad00000010000e00000b6578616d706c652e636f6d000b000403000102000a0016",
        "0014001d0017001e0019001801000101010201030104002300000016000000170000000d002a002804030503",
        "0603080708080809080a080b080408050806040105010601030303010302040205020602002b000908030403",
        "0303020301002d00020101003300260024001d00207ceb7f45d88f8f53797aaf3c6a68dc1586f4f30e0cad8c",
        "2e33657fe75b2ac23f",
    );
    const BIG: usize = 1 << 16;

    fn unhex(s: &str) -> Vec<u8> {
        let byte = |i| u8::from_str_radix(&s[i..i + 2], 16).unwrap();
        (0..s.len()).step_by(2).map(byte).collect()
    }

    fn be(n: usize, width: usize) -> Vec<u8> {
        n.to_be_bytes()[8 - width..].to_vec()
    }

    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        [&kind.to_be_bytes()[..], &be(data.len(), 2), data].concat()
    }

    /// A server_name extension with one list entry per (name_type, name).
    fn sni(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let entry = |&(t, n): &(u8, &[u8])| [&[t][..], &be(n.len(), 2), n].concat();
        let list: Vec<u8> = entries.iter().flat_map(entry).collect();
        ext(0, &[be(list.len(), 2), list].concat())
    }

    /// A ClientHello message; `tail` follows compression_methods (the extensions block).
    fn message(tail: &[u8]) -> Vec<u8> {
        let body = [&[3, 3][..], &[7; 32], &[0, 0, 2, 0x13, 0x01, 1, 0], tail].concat();
        [vec![CLIENT_HELLO], be(body.len(), 3), body].concat()
    }

    /// A message whose extensions block holds `exts`.
    fn with_exts(exts: &[u8]) -> Vec<u8> {
        message(&[be(exts.len(), 2), exts.to_vec()].concat())
    }

    /// A hello naming `name`, padded (extension 21) the way a post-quantum key share pads it.
    fn hello(name: Option<&str>, padding: usize) -> Vec<u8> {
        let name = name.map(|n| sni(&[(HOST_NAME, n.as_bytes())]));
        with_exts(&[name.unwrap_or_default(), ext(21, &vec![0; padding])].concat())
    }

    /// Wraps `msg` in handshake records of the given payload sizes; the last takes the rest.
    fn records(msg: &[u8], sizes: &[usize]) -> Vec<u8> {
        let (mut out, mut rest) = (Vec::new(), msg);
        for size in sizes.iter().copied().chain(std::iter::repeat(MAX_RECORD)) {
            let (part, tail) = rest.split_at(size.min(rest.len()));
            out.extend([&[HANDSHAKE, 3, 1][..], &be(part.len(), 2), part].concat());
            rest = tail;
            if rest.is_empty() {
                break;
            }
        }
        out
    }

    /// Checks that the prefixes of `input` at `splits` are `Incomplete` or the whole answer.
    fn agree(input: &[u8], max: usize, splits: impl Iterator<Item = usize>) -> Result<Peek, Error> {
        let whole = server_name(input, max);
        for k in splits {
            let part = server_name(&input[..k.min(input.len())], max);
            let ok = part == Ok(Peek::Incomplete) || part == whole;
            assert!(ok, "{k}: {part:?} / {whole:?} {input:02x?}");
        }
        whole
    }

    /// The answer for `input` after checking every prefix, so feeding it a byte at a time
    /// gives this answer too.
    fn fed(input: &[u8], max: usize) -> Result<Peek, Error> {
        agree(input, max, 0..=input.len())
    }

    /// The answer for `msg` in one record, fed a byte at a time.
    fn one_record(msg: &[u8]) -> Result<Peek, Error> {
        fed(&records(msg, &[]), BIG)
    }

    fn done(name: &str) -> Result<Peek, Error> {
        Ok(Peek::Done(Some(name.to_string())))
    }

    #[test]
    fn real_openssl_hello() {
        let input = unhex(OPENSSL);
        assert_eq!(fed(&input, BIG), done("example.com"));
        assert_eq!(server_name(&input, input.len()), done("example.com"));
        assert_eq!(server_name(&input, input.len() - 1), Err(Error::TooLarge));
        let split = records(&input[RECORD_HEADER..], &[2, 50]);
        assert_eq!(fed(&split, BIG), done("example.com"));
        // Bytes after the hello (0-RTT data, garbage) are never looked at.
        let more = [&input[..], b"\x17\x03\x03junk"].concat();
        assert_eq!(server_name(&more, BIG), done("example.com"));
    }

    #[test]
    fn names_are_folded_and_lose_one_trailing_dot() {
        let named = |raw| one_record(&hello(Some(raw), 0));
        assert_eq!(named("Example.COM."), done("example.com"));
        assert_eq!(named("_acme.A-1.io"), done("_acme.a-1.io"));
        assert_eq!(named("x"), done("x"));
        let longest = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        assert_eq!(named(&longest), done(&longest));
        // Only the first host_name entry counts; other name types are skipped.
        let two = sni(&[(7, b"skip"), (0, b"first.example"), (0, b"second")]);
        assert_eq!(one_record(&with_exts(&two)), done("first.example"));
    }

    #[test]
    fn no_host_name_is_done_with_none() {
        assert_eq!(one_record(&hello(None, 40)), Ok(Peek::Done(None)));
        assert_eq!(one_record(&message(&[])), Ok(Peek::Done(None)));
        assert_eq!(one_record(&with_exts(&[])), Ok(Peek::Done(None)));
        let other_type = sni(&[(7, b"not-a-host")]);
        assert_eq!(one_record(&with_exts(&other_type)), Ok(Peek::Done(None)));
    }

    #[test]
    fn post_quantum_sized_hello_across_records() {
        let msg = hello(Some("pq.example"), 1750);
        assert!((1700..1900).contains(&msg.len()));
        for sizes in [&[][..], &[1], &[3, 1, 1000], &[4, 600, 600], &[100; 30]] {
            assert_eq!(fed(&records(&msg, sizes), BIG), done("pq.example"));
        }
    }

    #[test]
    fn too_large() {
        let msg = hello(Some("pq.example"), 1750);
        let input = records(&msg, &[]);
        let size = input.len();
        // Decided from the handshake length, as soon as its header is in.
        assert_eq!(server_name(&input[..8], 1000), Ok(Peek::Incomplete));
        assert_eq!(server_name(&input[..9], 1000), Err(Error::TooLarge));
        assert_eq!(server_name(&input[..9], size - 1), Err(Error::TooLarge));
        assert_eq!(fed(&input, size), done("pq.example"));
        // Small records cost more headers than the bound assumes: decided at max_len bytes.
        let input = records(&msg, &[4, 100]);
        let max = msg.len() + 2 * RECORD_HEADER + 1; // above the bound, below the real size
        assert_eq!(server_name(&input[..max - 1], max), Ok(Peek::Incomplete));
        assert_eq!(server_name(&input[..max], max), Err(Error::TooLarge));
        assert_eq!(fed(&input, max), Err(Error::TooLarge));
    }

    #[test]
    fn not_tls() {
        assert_eq!(server_name(b"G", BIG), Err(Error::NotTls));
        assert_eq!(fed(b"GET / HTTP/1.1\r\n", BIG), Err(Error::NotTls));
        let sslv2 = [0x80, 0x2e, 0x01, 0x00, 0x02];
        assert_eq!(fed(&sslv2, BIG), Err(Error::NotTls));
        assert_eq!(fed(&[HANDSHAKE, 2, 0], BIG), Err(Error::NotTls));
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let garbage: Vec<u8> = (0..64).map(|_| xorshift(&mut x) as u8 | 1).collect();
        assert_eq!(fed(&garbage, BIG), Err(Error::NotTls)); // odd first byte, never 22
        assert_eq!(server_name(&[], BIG), Ok(Peek::Incomplete));
    }

    /// Bad inputs, each with the text its Malformed error must carry.
    fn malformed() -> Vec<(Vec<u8>, &'static str)> {
        let good = hello(Some("example.com"), 200);
        let set = |m: &[u8], at: usize, b: u8| {
            let mut m = m.to_vec();
            m[at] = b;
            m
        };
        let list = |l: &[u8]| with_exts(&ext(0, l));
        let twice = [sni(&[(0, b"a")]), sni(&[(0, b"b")])].concat();
        let msgs = [
            (set(&good, 0, 2), "handshake message is not a ClientHello"),
            (set(&message(&[]), 3, 10), "random overruns the message"),
            (set(&good, 38, 33), "session_id longer than 32 bytes"),
            (set(&good, 40, 3), "cipher_suites length odd or 0"),
            (set(&good, 40, 0), "cipher_suites length odd or 0"),
            (set(&good, 43, 0), "no compression method"),
            (set(&good, 46, good[46] - 1), "extensions length mismatch"),
            (set(&good, 50, 0xff), "extension overruns the message"),
            (message(&[0]), "extensions overrun the message"),
            (with_exts(&twice), "duplicate server_name"),
            (list(&[0, 0]), "bad server_name list length"),
            (list(&[0, 5, 0, 0, 1, 97]), "bad server_name list length"),
            (list(&[0, 4, 0, 0, 2, 97]), "server_name entry overrun"),
            (list(&[0]), "server_name list overruns the extension"),
        ];
        let long = "a".repeat(254);
        let names = ["a b", "a\0b", "a..b", "", ".", "x..", "\u{e9}", &long];
        let hosts = names.map(|n| (with_exts(&sni(&[(0, n.as_bytes())])), "invalid host name"));
        let framed = |(m, e): (Vec<u8>, _)| (records(&m, &[]), e);
        let mut all: Vec<_> = msgs.into_iter().chain(hosts).map(framed).collect();
        let second = |at: usize, b: u8| {
            let mut r = records(&good, &[100]);
            r[RECORD_HEADER + 100 + at] = b;
            r
        };
        let length = "record length 0 or over 16384";
        all.extend([
            (vec![HANDSHAKE, 3, 1, 0, 0], length),
            (vec![HANDSHAKE, 3, 1, 0x40, 1], length),
            (second(0, 23), "non-handshake record inside the hello"),
            (second(1, 2), "record version not 3.x"),
            (second(4, 0), length),
        ]);
        all
    }

    #[test]
    fn malformed_inputs() {
        for (input, why) in malformed() {
            assert_eq!(fed(&input, BIG), Err(Error::Malformed(why)), "{input:02x?}");
        }
    }

    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    #[test]
    fn mutated_hellos_keep_the_prefix_property() {
        let pq = records(&hello(Some("pq.example"), 1750), &[3, 700]);
        let mut seeds = vec![unhex(OPENSSL), pq];
        seeds.extend(malformed().into_iter().map(|(m, _)| m));
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = |n: usize| (xorshift(&mut x) % n as u64) as usize;
        for _ in 0..4000 {
            let mut input = seeds[rand(seeds.len())].clone();
            for _ in 0..=rand(4) {
                let at = rand(input.len());
                match rand(4) {
                    0 => input[at] ^= 1 << rand(8),
                    1 => input[at] = rand(256) as u8,
                    2 => input.truncate(at.max(1)),
                    _ => input.insert(at, rand(256) as u8),
                }
            }
            let max = [64, 300, 1000, 4096, BIG][rand(5)];
            let splits: Vec<usize> = (0..16).map(|_| rand(input.len() + 1)).collect();
            let _ = agree(&input, max, splits.into_iter());
        }
    }
}
