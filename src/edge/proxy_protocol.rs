//! PROXY protocol v1 (text) and v2 (binary) headers, as specified by HAProxy: parsing what a
//! load balancer in front of sluice sends, and encoding what sluice sends to backends.
//! Parsing is a pure function of the bytes received so far: the caller re-parses a growing
//! buffer, and the first answer other than `Incomplete` is final.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which of the two header formats; both carry the same information.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The human-readable line, `PROXY TCP4 ...\r\n`.
    V1,
    /// The binary header behind a 12-byte signature.
    V2,
}

/// What a header says about the connection it precedes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The original client; None for v1 "UNKNOWN", v2 LOCAL, or a v2 family sluice does not carry (AF_UNIX, UNSPEC).
    pub source: Option<SocketAddr>,
    /// The address the client connected to; None exactly when `source` is None.
    pub destination: Option<SocketAddr>,
    /// The format the header was received in.
    pub version: Version,
}

/// The answer for the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A valid start of a header: read more and parse again.
    Incomplete,
    /// A whole header of `consumed` bytes; the bytes after it belong to the application.
    Done {
        /// The parsed header.
        header: Header,
        /// The header's exact length in bytes.
        consumed: usize,
    },
}

/// Why the bytes are not an acceptable header; every error is final for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The first bytes match neither signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A header that breaks the spec; the text says which rule.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// The header is, or declares itself, longer than the caller's limit (or v1's 107 bytes).
    #[error("PROXY header longer than the limit")]
    TooLong,
}

/// Longest v1 header the spec allows, CRLF included.
pub const V1_MAX: usize = 107;

const V1_SIG: &[u8] = b"PROXY ";
const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol, 16-bit length.
const V2_FIXED: usize = 16;

/// Parses the header at the start of `buf` (all bytes received so far), reading at most `max_len`.
pub fn parse(buf: &[u8], max_len: usize) -> Result<Parsed, Error> {
    // Parsing only the first max_len bytes makes the cap structural: an answer never depends
    // on a byte past it, and a header still incomplete there is certainly too long.
    let seen = &buf[..buf.len().min(max_len)];
    match parse_prefix(seen, max_len)? {
        Parsed::Incomplete if buf.len() >= max_len => Err(Error::TooLong),
        parsed => Ok(parsed),
    }
}

/// Each check below looks at the bytes up to some position, is made as soon as they are in,
/// and the checks run in order of that position: so a prefix answers `Incomplete` or what
/// the whole input answers.
fn parse_prefix(buf: &[u8], max_len: usize) -> Result<Parsed, Error> {
    let Some(&first) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    // The two signatures differ in their first byte, which picks the one to compare against.
    let sig = match first {
        b'P' => V1_SIG,
        b'\r' => V2_SIG,
        _ => return Err(Error::NotProxy),
    };
    let n = buf.len().min(sig.len());
    if buf[..n] != sig[..n] {
        return Err(Error::NotProxy);
    }
    if buf.len() < sig.len() {
        return Ok(Parsed::Incomplete);
    }
    if first == b'P' {
        parse_v1(buf)
    } else {
        parse_v2(buf, max_len)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    // The line ends at its first CR or LF, which must be a CR followed by an LF within V1_MAX.
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(Error::TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if buf[end] == b'\n' {
        return Err(Error::Malformed("v1 LF without CR"));
    }
    if end + 2 > V1_MAX {
        return Err(Error::TooLong);
    }
    match buf.get(end + 1) {
        None => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(Error::Malformed("v1 CR without LF")),
    }
    // Split on bytes, not text: whatever follows UNKNOWN is ignored, even if it is not ASCII.
    let fields: Vec<&[u8]> = buf[V1_SIG.len()..end].split(|&b| b == b' ').collect();
    let addresses = match fields[..] {
        [b"UNKNOWN", ..] => None,
        [proto @ (b"TCP4" | b"TCP6"), src, dst, sport, dport] => {
            let v6 = proto == b"TCP6";
            let src = SocketAddr::new(v1_ip(src, v6)?, v1_port(sport)?);
            let dst = SocketAddr::new(v1_ip(dst, v6)?, v1_port(dport)?);
            Some((src, dst))
        }
        [b"TCP4" | b"TCP6", ..] => {
            return Err(Error::Malformed(
                "v1 needs 4 fields after TCP4/TCP6, single-spaced",
            ));
        }
        _ => return Err(Error::Malformed("v1 protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(done(Version::V1, addresses, end + 2))
}

/// std's parsers reject IPv4 octets with leading zeros, and each family's parser rejects
/// the other family's syntax.
fn v1_ip(field: &[u8], v6: bool) -> Result<IpAddr, Error> {
    let text = std::str::from_utf8(field).unwrap_or("");
    let ip = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map_err(|_| Error::Malformed("v1 address invalid or not of its protocol's family"))
}

/// Plain decimal without leading zeros: `u16::from_str` would also take "+80" and "080".
fn v1_port(field: &[u8]) -> Result<u16, Error> {
    let canonical = matches!(field, [b'0'] | [b'1'..=b'9', ..])
        && field.len() <= 5
        && field.iter().all(u8::is_ascii_digit);
    // Only five digits at most reach the sum, so it cannot overflow.
    let value = canonical.then(|| field.iter().fold(0, |n, &d| n * 10 + u32::from(d - b'0')));
    value
        .and_then(|v| u16::try_from(v).ok())
        .ok_or(Error::Malformed(
            "v1 port not decimal 0-65535 without leading 0",
        ))
}

fn parse_v2(buf: &[u8], max_len: usize) -> Result<Parsed, Error> {
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    if ver_cmd >> 4 != 2 {
        return Err(Error::Malformed("v2 version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Error::Malformed("v2 command is not LOCAL or PROXY")),
    };
    let Some(&fam) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // A LOCAL header's family is ignored by the spec, so only PROXY's is checked.
    let addr_len = match fam {
        _ if local => 0,
        0x00 => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ => return Err(Error::Malformed("v2 family/protocol is not a known pair")),
    };
    if buf.len() < V2_FIXED {
        return Ok(Parsed::Incomplete);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len < addr_len {
        return Err(Error::Malformed(
            "v2 address block too short for its family",
        ));
    }
    // Decided from the fixed part alone, before any of the declared bytes are waited for.
    let total = V2_FIXED + len;
    if total > max_len {
        return Err(Error::TooLong);
    }
    let Some(block) = buf.get(V2_FIXED..total) else {
        return Ok(Parsed::Incomplete);
    };
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    let v4 = |at: usize| IpAddr::from([block[at], block[at + 1], block[at + 2], block[at + 3]]);
    let v6 = |at: usize| {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&block[at..at + 16]);
        IpAddr::from(octets)
    };
    let addresses = match fam {
        _ if local => None,
        0x11 | 0x12 => Some((
            SocketAddr::new(v4(0), port(8)),
            SocketAddr::new(v4(4), port(10)),
        )),
        0x21 | 0x22 => Some((
            SocketAddr::new(v6(0), port(32)),
            SocketAddr::new(v6(16), port(34)),
        )),
        // UNSPEC and UNIX: sluice cannot carry them on, so the connection's own addresses stand.
        _ => None,
    };
    // TLVs in block[addr_len..] are skipped: sluice uses none of them.
    Ok(done(Version::V2, addresses, total))
}

fn done(version: Version, addresses: Option<(SocketAddr, SocketAddr)>, consumed: usize) -> Parsed {
    let (source, destination) = addresses.unzip();
    let header = Header {
        source,
        destination,
        version,
    };
    Parsed::Done { header, consumed }
}

/// Appends a header for a proxied connection; v2 uses the PROXY command, TCP over IPv4/IPv6; mixed families are encoded by mapping the IPv4 one to IPv6 (v2) / using TCP6 for both (v1).
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    let pair = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Ok((s, d)),
        (s, d) => Err((as_v6(s), as_v6(d))),
    };
    let (sport, dport) = (source.port(), destination.port());
    match version {
        Version::V1 => {
            let line = match pair {
                Ok((s, d)) => format!("PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
                Err((s, d)) => format!("PROXY TCP6 {s} {d} {sport} {dport}\r\n"),
            };
            out.extend_from_slice(line.as_bytes());
        }
        Version::V2 => {
            out.extend_from_slice(V2_SIG);
            out.push(0x21); // version 2, PROXY
            match pair {
                Ok((s, d)) => {
                    out.extend_from_slice(&[0x11, 0, 12]); // TCP over IPv4, 12 address bytes
                    out.extend(s.octets().into_iter().chain(d.octets()));
                }
                Err((s, d)) => {
                    out.extend_from_slice(&[0x21, 0, 36]); // TCP over IPv6, 36 address bytes
                    out.extend(s.octets().into_iter().chain(d.octets()));
                }
            }
            out.extend_from_slice(&sport.to_be_bytes());
            out.extend_from_slice(&dport.to_be_bytes());
        }
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Appends a header that carries no addresses: v1 "PROXY UNKNOWN\r\n", v2 LOCAL command with family UNSPEC and length 0. Used by health checks.
pub fn encode_local(version: Version, out: &mut Vec<u8>) {
    match version {
        Version::V1 => out.extend_from_slice(b"PROXY UNKNOWN\r\n"),
        Version::V2 => {
            out.extend_from_slice(V2_SIG);
            out.extend_from_slice(&[0x20, 0x00, 0, 0]); // version 2, LOCAL, UNSPEC, length 0
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SPEC_V1: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    /// PROXY, TCP over IPv4, 192.0.2.1:54321 -> 198.51.100.7:443, then an AUTHORITY TLV.
    const V2_TLV: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x16\
        \xc0\x00\x02\x01\xc6\x33\x64\x07\xd4\x31\x01\xbb\x02\x00\x07example";

    fn header(version: Version, src: &str, dst: &str) -> Header {
        let (source, destination) = (src.parse().ok(), dst.parse().ok());
        Header {
            source,
            destination,
            version,
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn done(buf: &[u8], max_len: usize) -> (Header, usize) {
        match parse(buf, max_len) {
            Ok(Parsed::Done { header, consumed }) => (header, consumed),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    /// Every prefix answers `Incomplete` or exactly what the whole input answers.
    fn check_prefixes(input: &[u8], max_len: usize) {
        let whole = parse(input, max_len);
        if let Ok(Parsed::Done { consumed, .. }) = &whole {
            assert!(*consumed <= input.len().min(max_len));
            // The header alone answers the same: nothing after it was looked at.
            assert_eq!(parse(&input[..*consumed], max_len), whole);
        }
        for k in 0..input.len() {
            let part = parse(&input[..k], max_len);
            let ok = part == Ok(Parsed::Incomplete) || part == whole;
            assert!(ok, "{input:?} at {k}: {part:?}, whole {whole:?}");
            if let Ok(Parsed::Done { consumed, .. }) = part {
                assert!(consumed <= k, "{input:?} at {k}: consumed {consumed}");
            }
        }
    }

    fn malformed(input: &[u8]) {
        let got = parse(input, 4096);
        assert!(
            matches!(got, Err(Error::Malformed(_))),
            "{input:?}: {got:?}"
        );
        check_prefixes(input, 4096);
    }

    #[test]
    fn spec_vectors() {
        let v1 = header(Version::V1, "192.168.0.1:56324", "192.168.0.11:443");
        assert_eq!(done(SPEC_V1, 4096), (v1, SPEC_V1.len()));
        let v2 = header(Version::V2, "192.0.2.1:54321", "198.51.100.7:443");
        assert_eq!(done(V2_TLV, 4096), (v2, V2_TLV.len()));
        check_prefixes(SPEC_V1, 4096);
        check_prefixes(V2_TLV, 4096);
    }

    #[test]
    fn round_trips() {
        // source, destination, and what comes back: mixed families map the IPv4 side to IPv6.
        let cases = [
            "10.0.0.1:1000 10.0.0.2:80 10.0.0.1:1000 10.0.0.2:80",
            "[2001:db8::1]:0 [::1]:65535 [2001:db8::1]:0 [::1]:65535",
            "10.0.0.1:5 [2001:db8::2]:6 [::ffff:10.0.0.1]:5 [2001:db8::2]:6",
            "[2001:db8::1]:5 10.0.0.2:6 [2001:db8::1]:5 [::ffff:10.0.0.2]:6",
        ];
        for version in [Version::V1, Version::V2] {
            for case in cases {
                let a: Vec<SocketAddr> = case.split(' ').map(addr).collect();
                let mut out = Vec::new();
                encode(version, a[0], a[1], &mut out);
                let want = Header {
                    source: Some(a[2]),
                    destination: Some(a[3]),
                    version,
                };
                assert_eq!(done(&out, 4096), (want, out.len()));
                check_prefixes(&out, 4096);
            }
        }
    }

    #[test]
    fn local_round_trips() {
        let v2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\0\0\0";
        for (version, want) in [(Version::V1, &b"PROXY UNKNOWN\r\n"[..]), (Version::V2, v2)] {
            let mut out = Vec::new();
            encode_local(version, &mut out);
            assert_eq!(out, want);
            assert_eq!(done(&out, 4096), (header(version, "", ""), out.len()));
        }
    }

    #[test]
    fn trailing_application_bytes_are_not_consumed() {
        for head in [SPEC_V1, V2_TLV] {
            let input = [head, b"GET / HTTP/1.1\r\n\r\n"].concat();
            assert_eq!(done(&input, 4096).1, head.len());
            check_prefixes(&input, 4096);
        }
    }

    #[test]
    fn not_proxy_fails_on_the_first_wrong_byte() {
        let inputs: [&[u8]; 6] = [
            b"G",
            b"GET / HTTP/1.1\r\n",
            b"\x16\x03\x01",
            b"PROXY\r\n",
            b"PROXYTCP4",
            b"\r\n\r\n\0\r\nQUIX",
        ];
        for input in inputs {
            assert_eq!(parse(input, 4096), Err(Error::NotProxy));
            check_prefixes(input, 4096);
        }
        assert_eq!(parse(b"", 4096), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROX", 4096), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v1_unknown_ignores_the_rest_of_the_line() {
        let longest = format!(
            "PROXY UNKNOWN {0} {0} 65535 65535\r\n",
            ["ffff"; 8].join(":")
        );
        assert_eq!(longest.len(), V1_MAX);
        let inputs = [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN 1.2.3.4 \xff\r\n",
            longest.as_bytes(),
        ];
        for input in inputs {
            assert_eq!(
                done(input, 4096),
                (header(Version::V1, "", ""), input.len())
            );
        }
    }

    #[test]
    fn v1_malformed() {
        let good = "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
        // Each pair replaces its first text in `good` with its second.
        let bad = [
            ("TCP4", "TCP5"),
            ("TCP4", "tcp4"),
            ("TCP4", "UNKNOWNX"),
            ("TCP4", "TCP6"),
            ("TCP4 ", "TCP4  "),
            (" 2\r", " 2 \r"),
            (" 1 2", " 1"),
            (" 1 2", " 1 2 3"),
            ("1.2.3.4", "1.2.3.256"),
            ("1.2.3.4", "01.2.3.4"),
            ("1.2.3.4", "1.2.3"),
            ("1.2.3.4", "::1"),
            (" 1 ", " 65536 "),
            (" 1 ", " 080 "),
            (" 1 ", " +80 "),
            (" 1 ", " -1 "),
            (" 1 ", " 8a "),
            (" 1 ", " 99999999999999999999 "),
            ("\r\n", "\n"),
            ("4 5", "4\r5"),
            ("4 5", "4\n5"),
            ("\r\n", "\r\r\n"),
            ("\r\n", "\rX"),
        ];
        for (from, to) in bad {
            malformed(good.replacen(from, to, 1).as_bytes());
        }
        malformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n");
        malformed(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n");
        malformed(b"PROXY \r\n");
        malformed(b"PROXY TCP4\r\n");
    }

    /// The hand-built v2 header with byte `at` replaced.
    fn v2_with(at: usize, byte: u8) -> Vec<u8> {
        let mut h = V2_TLV.to_vec();
        h[at] = byte;
        h
    }

    #[test]
    fn v2_malformed() {
        for ver_cmd in [0x11, 0x31, 0x22, 0x2f] {
            malformed(&v2_with(12, ver_cmd));
        }
        for fam in [0x01, 0x10, 0x13, 0x23, 0x33, 0x41, 0xff] {
            malformed(&v2_with(13, fam));
        }
        // Address blocks one byte short of INET (12), INET6 (36) and UNIX (216), known as
        // soon as the fixed part is in.
        for (fam, len) in [(0x11, 11), (0x22, 35), (0x31, 215)] {
            let mut h = v2_with(13, fam);
            h[15] = len;
            assert!(matches!(parse(&h[..16], 4096), Err(Error::Malformed(_))));
        }
    }

    #[test]
    fn v2_families_without_addresses() {
        // UNIX and UNSPEC carry nothing sluice uses; LOCAL ignores its family.
        let mut unix = b"\r\n\r\n\0\r\nQUIT\n\x21\x31\x00\xd8".to_vec();
        unix.resize(16 + 216, b'/');
        let unspec = b"\r\n\r\n\0\r\nQUIT\n\x21\x00\x00\x00".to_vec();
        let local_unix = [&V2_TLV[..12], b"\x20\x31\0\0"].concat();
        for input in [unix, unspec, v2_with(12, 0x20), local_unix] {
            assert_eq!(
                done(&input, 4096),
                (header(Version::V2, "", ""), input.len())
            );
        }
        let mut udp6 = Vec::new();
        encode(Version::V2, addr("[::1]:1"), addr("[::2]:2"), &mut udp6);
        udp6[13] = 0x22;
        assert_eq!(
            done(&udp6, 4096).0,
            header(Version::V2, "[::1]:1", "[::2]:2")
        );
    }

    #[test]
    fn too_long() {
        // v1: no CR or LF within 107 bytes (whatever comes later), or a CR at 106 whose LF
        // would be byte 108.
        let no_crlf = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100], b"\n"].concat();
        assert_eq!(parse(&no_crlf[..V1_MAX], 4096), Err(Error::TooLong));
        assert_eq!(parse(&no_crlf, 4096), Err(Error::TooLong));
        let cr_late = [&no_crlf[..106], b"\r"].concat();
        assert_eq!(parse(&cr_late, 4096), Err(Error::TooLong));
        // The caller's cap; v2's from the declared length, before the body is in.
        assert_eq!(parse(SPEC_V1, SPEC_V1.len() - 1), Err(Error::TooLong));
        assert_eq!(done(SPEC_V1, SPEC_V1.len()).1, SPEC_V1.len());
        assert_eq!(parse(&V2_TLV[..16], V2_TLV.len() - 1), Err(Error::TooLong));
        assert_eq!(done(V2_TLV, V2_TLV.len()).1, V2_TLV.len());
        assert_eq!(parse(&V2_TLV[..10], 10), Err(Error::TooLong));
        let huge = [&V2_TLV[..14], b"\xff\xff"].concat();
        assert_eq!(parse(&huge, 4096), Err(Error::TooLong));
        let cases: [(&[u8], usize); 5] = [
            (&no_crlf, 4096),
            (&cr_late, 4096),
            (&huge, 4096),
            (SPEC_V1, 20),
            (V2_TLV, 10),
        ];
        for (input, max_len) in cases {
            check_prefixes(input, max_len);
        }
    }

    /// Mutates valid headers at random and checks the prefix property at every split.
    #[test]
    fn randomized_prefix_property() {
        let mut seeds = vec![
            SPEC_V1.to_vec(),
            V2_TLV.to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
        ];
        for (src, dst) in [
            ("1.2.3.4:5", "6.7.8.9:10"),
            ("[2001:db8::1]:443", "[fe80::1]:0"),
        ] {
            for version in [Version::V1, Version::V2] {
                let mut out = Vec::new();
                encode(version, addr(src), addr(dst), &mut out);
                out.extend_from_slice(b"app");
                seeds.push(out);
            }
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64; // xorshift64
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        const INTERESTING: &[u8] = b" \r\n0.:9fP\x00\x11\x20\x21\x22\x31\xff";
        for _ in 0..5000 {
            let mut input = seeds[next(seeds.len())].clone();
            for _ in 0..1 + next(3) {
                // Mostly past the first 6 bytes, where a mutation does not just spoil the signature.
                let at = [0, 6][next(4).min(1)] + next(input.len() - 6);
                let byte = match next(2) {
                    0 => INTERESTING[next(INTERESTING.len())],
                    _ => next(256) as u8,
                };
                match next(5) {
                    0 => input.insert(at, byte),
                    1 => drop(input.remove(at)),
                    2 => drop(input.splice(at..at, vec![byte; next(30)])),
                    _ => input[at] = byte,
                }
            }
            let max_len = [10, 16, 40, 107, next(300), 4096, 4096, 4096][next(8)];
            check_prefixes(&input, max_len);
        }
    }
}
