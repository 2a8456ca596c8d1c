//! Bytes a client sends and checks, and the few protocols the tests speak themselves:
//! deterministic payloads, an exchange that half-closes, plain HTTP/1.0 GET, text files.

use std::net::SocketAddr;
use std::path::Path;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::eventually::{PROMPTLY, STUCK, eventually};

/// `len` deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Sends `payload`, half-closes, and reads until EOF, concurrently.
pub async fn exchange(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    exchange_on(&mut s, payload).await
}

pub async fn exchange_on(s: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::with_capacity(payload.len());
    let recv = r.read_to_end(&mut got);
    let joined = tokio::time::timeout(STUCK, async { tokio::join!(send, recv) }).await;
    let ((), n) = joined.expect("the exchange finished");
    n.unwrap();
    got
}

/// Reads exactly `n` bytes.
pub async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(STUCK, s.read_exact(&mut buf))
        .await
        .expect("the bytes arrived")
        .unwrap();
    buf
}

/// Waits for the peer to close `s`: `Ok(bytes read before EOF)`, or the error (a reset).
pub async fn until_closed(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(STUCK, s.read(&mut buf)).await {
            Err(_) => panic!("connection was never closed"),
            Ok(Ok(0)) => return Ok(total),
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Whether `s` has nothing to read yet (no byte, no EOF, no error), without waiting.
pub fn nothing_to_read(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Waits until a connect to `addr` is refused, closing any connection that still lands.
/// A reset is a connect caught in the accept queue as the listening socket closed.
pub async fn until_refused(addr: SocketAddr) {
    eventually(
        &format!("connects to {addr} refused"),
        async || match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Err("a connect reset"),
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(_) => Err("a connect was accepted"),
        },
    )
    .await
}

/// `GET path` over HTTP/1.0: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(PROMPTLY, http_get_unbounded(addr, path))
        .await
        .unwrap_or_else(|_| panic!("GET {path} from {addr} was answered"))
}

async fn http_get_unbounded(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: sluice\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The lines of a text file (none if it does not exist yet).
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until `path` has at least `n` lines (sluice's access log writer is its own
/// thread, with nothing to wait on but the file).
pub async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let what = format!("{n} lines in {}", path.display());
    eventually(&what, async || {
        let l = lines(path);
        if l.len() >= n {
            Ok(l)
        } else {
            Err(format!("{} lines:\n{}", l.len(), l.join("\n")))
        }
    })
    .await
}
