//! Fake backends on loopback, each bound on port 0: an echo, one that tags each
//! connection with a byte, one that refuses, one that never completes a handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::io::read_n;

/// A backend on loopback; counts the connections it accepted. Stops when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Serves each connection with `serve` on 127.0.0.1:0.
    pub async fn start<F, Fut>(serve: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Backend::start_on("127.0.0.1:0", serve).await
    }

    pub async fn start_on<F, Fut>(bind: &str, serve: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = listen(bind.parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        Backend {
            addr,
            accepted,
            task,
        }
    }

    /// Echoes every byte; half-closes after the client does.
    pub async fn echo() -> Backend {
        Backend::start(echo).await
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How many connections a backend's kernel queue holds before it accepts them: more
/// than any test opens at once. `TcpListener::bind` asks for 128 (mio's choice), and a
/// burst of 750 connects from sluice to one backend overflowed that: the kernel fell
/// back to SYN cookies, some of which it then refused with a reset, and the test saw
/// `backend_reset` where it expected an echo. The kernel caps it at
/// `net.core.somaxconn` (4096 since Linux 5.4, 128 before).
const BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> TcpListener {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    socket.listen(BACKLOG).unwrap()
}

pub async fn echo(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// Sends `tag` on connect, then echoes: tells a client which backend it reached.
pub async fn tagged(tag: u8) -> Backend {
    Backend::start(move |s: TcpStream| tag_then_echo(s, tag)).await
}

async fn tag_then_echo(mut s: TcpStream, tag: u8) {
    if s.write_all(&[tag]).await.is_ok() {
        echo(s).await;
    }
}

/// Connects to `addr` from `source` (any 127.0.0.0/8 address works on Linux) and
/// returns the stream and the tag of the backend that answered.
pub async fn connect_tagged(addr: SocketAddr, source: Option<std::net::IpAddr>) -> (TcpStream, u8) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let mut s = socket.connect(addr).await.unwrap();
    let tag = read_n(&mut s, 1).await[0];
    (s, tag)
}

/// An address whose connects are refused: a bound socket that never listens, held so
/// the port cannot be reused while the test runs.
pub struct Refusing {
    pub addr: SocketAddr,
    socket: socket2::Socket,
}

impl Refusing {
    /// Starts listening on the address, tagging each connection like [`tagged`].
    pub fn listen_and_tag(&self, tag: u8) {
        self.socket.listen(128).unwrap();
        self.socket.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(self.socket.try_clone().unwrap().into()).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(tag_then_echo(s, tag));
            }
        });
    }
}

pub fn refusing() -> Refusing {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    Refusing { addr, socket }
}

/// A listener whose accept queue is full, so a new connect never completes its handshake
/// (Linux drops the SYN). Holds the queued connections for as long as it lives.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<std::net::TcpStream>,
}

pub fn blackhole() -> Blackhole {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue until a connect stops completing; a backlog of 0 holds one or two.
    // The connect timeout is what tells a full queue: nothing else shows it.
    let mut queued = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => {
                return Blackhole {
                    addr,
                    _listener: listener,
                    _queued: queued,
                };
            }
        }
    }
    panic!("the accept queue never filled");
}
