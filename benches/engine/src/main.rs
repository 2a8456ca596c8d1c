//! Experiment: the cost of a proxied new connection in a minimal tokio proxy against a
//! minimal io_uring proxy, both one thread per core on SO_REUSEPORT sockets.
//! usage: engine MODE LISTEN BACKEND THREADS, MODE one of tokio, uring, hybrid, monoio,
//! ring, poll, ringio, pollrecv, provided (those five described at `ring_proxy`), compio
//! (compio.rs)
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};

mod compio;
mod ring;

fn listener(addr: SocketAddr) -> std::net::TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    s.set_tcp_nodelay(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(1024).unwrap();
    s.into()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args[1].clone();
    let listen: SocketAddr = args[2].parse().unwrap();
    let backend: SocketAddr = args[3].parse().unwrap();
    let threads: usize = args[4].parse().unwrap();
    let mut handles = Vec::new();
    for _ in 0..threads {
        let l = listener(listen);
        let mode = mode.clone();
        handles.push(std::thread::spawn(move || match mode.as_str() {
            "tokio" => tokio_worker(l, backend),
            "uring" => uring_worker(l, backend),
            "hybrid" => hybrid_worker(l, backend),
            "monoio" => monoio_worker(l, backend),
            "ring" => ring_proxy(l, backend, Calls::Ring, false, ring_pump),
            "poll" => ring_proxy(l, backend, Calls::Plain, false, poll_pump),
            "ringio" => ring_proxy(l, backend, Calls::Plain, false, ring_pump),
            "pollrecv" => ring_proxy(l, backend, Calls::Ring, false, pollrecv_pump),
            "provided" => ring_proxy(l, backend, Calls::Ring, true, provided_pump),
            "compio" => compio::proxy(l, backend),
            _ => panic!("mode"),
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
}

fn tokio_worker(l: std::net::TcpListener, backend: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let Ok(mut b) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = b.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
            });
        }
    });
}

// ---- tokio-uring: a tokio current-thread runtime whose reactor also drives a ring ----

fn hybrid_worker(l: std::net::TcpListener, backend: SocketAddr) {
    tokio_uring::start(async move {
        let l = tokio_uring::net::TcpListener::from_std(l);
        loop {
            let (c, _) = l.accept().await.unwrap();
            tokio_uring::spawn(async move {
                let Ok(b) = tokio_uring::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = b.set_nodelay(true);
                let c = std::rc::Rc::new(c);
                let b = std::rc::Rc::new(b);
                let up = tokio_uring::spawn(pump(c.clone(), b.clone()));
                pump(b, c).await;
                let _ = up.await;
            });
        }
    });
}

async fn pump(
    from: std::rc::Rc<tokio_uring::net::TcpStream>,
    to: std::rc::Rc<tokio_uring::net::TcpStream>,
) {
    let mut buf = vec![0u8; BUF];
    loop {
        let (r, b) = from.read(buf).await;
        buf = b;
        match r {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                use tokio_uring::buf::BoundedBuf;
                let (w, b) = to.write_all(buf.slice(..n)).await;
                buf = b.into_inner();
                if w.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

// ---- monoio: a thread-per-core runtime whose own loop is the ring ----

fn monoio_worker(l: std::net::TcpListener, backend: SocketAddr) {
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = monoio::net::TcpListener::from_std(l).unwrap();
        loop {
            let (c, _) = l.accept().await.unwrap();
            monoio::spawn(async move {
                use monoio::io::{AsyncWriteRent, Splitable};
                let Ok(b) = monoio::net::TcpStream::connect_addr(backend).await else {
                    return;
                };
                let _ = b.set_nodelay(true);
                let (mut cr, mut cw) = c.into_split();
                let (mut br, mut bw) = b.into_split();
                let up = async {
                    let _ = monoio::io::copy(&mut cr, &mut bw).await;
                    let _ = bw.shutdown().await;
                };
                let down = async {
                    let _ = monoio::io::copy(&mut br, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                monoio::join!(up, down);
            });
        }
    });
}

// ---- ring: tokio current-thread runtime, its I/O on a ring submitted at park (ring.rs) ----

/// How a ring proxy makes and closes its backend socket: on the ring
/// (`IORING_OP_SOCKET`, `CONNECT`, `CLOSE`), or with the plain system calls (connect's
/// outcome then waited for with a `POLL_ADD`).
#[derive(Clone, Copy)]
enum Calls {
    Ring,
    Plain,
}

/// The proxy of every mode driven by ring.rs: a tokio current-thread runtime whose ring
/// is submitted and reaped at park, a multishot accept, a task per connection that
/// connects (`calls`), relays both ways with `pump` and closes. The modes:
///
/// - `ring`: `Calls::Ring`, `ring_pump` (recv and send on the ring, a 16 KiB buffer
///   per direction).
/// - `poll`: `Calls::Plain`, `poll_pump`. The ring only accepts and reports readiness
///   (one-shot `POLL_ADD`); socket, connect, recv, send, shutdown and close are the
///   plain system calls an epoll engine makes, so what differs from tokio's reactor is
///   only the registration (none: no epoll_ctl ADD or DEL), the waits (batched in the
///   ring, no epoll_wait per event) and the accept that ends in EAGAIN (none).
/// - `ringio`: `Calls::Plain`, `ring_pump`: between `poll` and `ring`, recv and send on
///   the ring, socket, connect, shutdown and close plain.
/// - `pollrecv`: `Calls::Ring`, `pollrecv_pump`: `ring` with sluice's readiness-first
///   reads.
/// - `provided`: `Calls::Ring`, `provided_pump` and the thread's buffer ring
///   (`provided`): `ring` with provided buffers.
fn ring_proxy<P, F>(
    l: std::net::TcpListener,
    backend: SocketAddr,
    calls: Calls,
    provided: bool,
    pump: P,
) where
    P: Fn(RawFd, RawFd) -> F + Copy + 'static,
    F: std::future::Future<Output = ()> + 'static,
{
    let fd = ring::init();
    if provided {
        ring::init_provided();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(ring::turn)
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        tokio::task::spawn_local(ring::reaper(fd));
        let lfd = l.into_raw_fd();
        let accepts = ring::Accepts::new(lfd);
        let baddr = std::rc::Rc::new(socket2::SockAddr::from(backend));
        loop {
            let c = accepts.next().await;
            if c < 0 {
                continue;
            }
            let baddr = baddr.clone();
            tokio::task::spawn_local(async move {
                let b = match calls {
                    Calls::Ring => ring::connect(baddr).await.ok(),
                    Calls::Plain => poll_connect(&baddr).await,
                };
                let Some(b) = b else {
                    close(calls, c).await;
                    return;
                };
                nodelay(b);
                tokio::join!(pump(c, b), pump(b, c));
                close(calls, c).await;
                close(calls, b).await;
            });
        }
    });
}

async fn close(calls: Calls, fd: RawFd) {
    match calls {
        Calls::Ring => ring::close(fd).await,
        Calls::Plain => unsafe {
            libc::close(fd);
        },
    }
}

async fn poll_connect(addr: &socket2::SockAddr) -> Option<RawFd> {
    let s = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if s < 0 {
        return None;
    }
    let r = unsafe { libc::connect(s, addr.as_ptr().cast(), addr.len()) };
    if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        unsafe { libc::close(s) };
        return None;
    }
    let m = ring::poll(s, libc::POLLOUT as u32).await;
    if m < 0 || m & (libc::POLLERR | libc::POLLHUP) as i32 != 0 {
        unsafe { libc::close(s) };
        return None;
    }
    Some(s)
}

/// Readiness first, as sluice's relay: wait readable, then read; write until done,
/// waiting writable on EAGAIN.
async fn poll_pump(from: RawFd, to: RawFd) {
    let mut buf = vec![0u8; BUF];
    'relay: loop {
        let m = ring::poll(from, libc::POLLIN as u32).await;
        if m < 0 {
            break;
        }
        let n = unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
            continue;
        }
        if n <= 0 {
            break;
        }
        let n = n as usize;
        let mut off = 0;
        while off < n {
            let w =
                unsafe { libc::send(to, buf[off..n].as_ptr().cast(), n - off, libc::MSG_NOSIGNAL) };
            if w < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
                if ring::poll(to, libc::POLLOUT as u32).await < 0 {
                    break 'relay;
                }
                continue;
            }
            if w <= 0 {
                break 'relay;
            }
            off += w as usize;
        }
    }
    unsafe { libc::shutdown(to, libc::SHUT_WR) };
}

/// Each recv is posted at once with no buffer of its own; the kernel takes one from
/// the thread's buffer ring when bytes arrive, and it goes back to the ring once sent.
/// An idle connection then holds no buffer, and a read costs one ring operation, not
/// `pollrecv_pump`'s two.
async fn provided_pump(from: RawFd, to: RawFd) {
    'relay: loop {
        let (n, bid) = ring::recv_provided(from).await;
        let Some(bid) = bid else {
            if n == -libc::ENOBUFS {
                panic!("the buffer ring ran dry");
            }
            break;
        };
        if n <= 0 {
            ring::give_back(bid);
            break;
        }
        let data = ring::provided(bid, n as usize);
        let mut off = 0;
        while off < data.len() {
            let w = ring::send_raw(to, data[off..].as_ptr(), data.len() - off).await;
            if w <= 0 {
                ring::give_back(bid);
                break 'relay;
            }
            off += w as usize;
        }
        ring::give_back(bid);
    }
    unsafe { libc::shutdown(to, libc::SHUT_WR) };
}

/// Each direction waits for POLLIN on the ring before it posts its recv, so a
/// connection with nothing to read has no buffer lent to the kernel (an idle
/// connection then holds none, as sluice's relay does).
async fn pollrecv_pump(from: RawFd, to: RawFd) {
    'relay: loop {
        if ring::poll(from, libc::POLLIN as u32).await < 0 {
            break;
        }
        // Borrowed only now that bytes (or a FIN) wait.
        let (n, mut buf) = ring::recv(from, vec![0u8; BUF]).await;
        if n <= 0 {
            break;
        }
        let n = n as usize;
        let mut off = 0;
        while off < n {
            let (w, b) = ring::send(to, buf, off, n).await;
            buf = b;
            if w <= 0 {
                break 'relay;
            }
            off += w as usize;
        }
    }
    unsafe { libc::shutdown(to, libc::SHUT_WR) };
}

fn nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
}

async fn ring_pump(from: RawFd, to: RawFd) {
    let mut buf = vec![0u8; BUF];
    'relay: loop {
        let (n, b) = ring::recv(from, buf).await;
        buf = b;
        if n <= 0 {
            break;
        }
        let n = n as usize;
        let mut off = 0;
        while off < n {
            let (w, b) = ring::send(to, buf, off, n).await;
            buf = b;
            if w <= 0 {
                break 'relay;
            }
            off += w as usize;
        }
    }
    unsafe { libc::shutdown(to, libc::SHUT_WR) };
}

// ---- io_uring ----

use io_uring::{IoUring, opcode, squeue, types};

const BUF: usize = 16 * 1024;
const ACCEPT: u64 = u64::MAX;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    Socket = 0,
    Connect = 1,
    RecvC = 2, // from client
    RecvB = 3, // from backend
    SendB = 4, // to backend
    SendC = 5, // to client
    Close = 6,
}

fn op_of(v: u64) -> Op {
    match v & 0xff {
        0 => Op::Socket,
        1 => Op::Connect,
        2 => Op::RecvC,
        3 => Op::RecvB,
        4 => Op::SendB,
        5 => Op::SendC,
        _ => Op::Close,
    }
}

struct Dir {
    buf: Box<[u8]>,
    len: usize,
    off: usize,
    done: bool,
}

struct Conn {
    client: RawFd,
    backend: RawFd,
    /// client to backend, backend to client
    dirs: [Dir; 2],
    inflight: u32,
    failed: bool,
    closing: bool,
}

fn ud(slot: usize, op: Op) -> u64 {
    ((slot as u64) << 8) | op as u64
}

fn uring_worker(l: std::net::TcpListener, backend: SocketAddr) {
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)
        .unwrap();
    let lfd = l.into_raw_fd();
    let baddr: socket2::SockAddr = backend.into();
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut pending: Vec<squeue::Entry> = Vec::new();
    let accept = opcode::AcceptMulti::new(types::Fd(lfd))
        .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        .build()
        .user_data(ACCEPT);
    pending.push(accept.clone());
    let one: libc::c_int = 1;
    loop {
        {
            let mut sq = ring.submission();
            for e in pending.drain(..) {
                unsafe { sq.push(&e).expect("sq full") };
            }
        }
        ring.submit_and_wait(1).unwrap();
        let cqes: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (data, res, flags) in cqes {
            if data == ACCEPT {
                if !io_uring::cqueue::more(flags) {
                    pending.push(accept.clone());
                }
                if res < 0 {
                    continue;
                }
                let slot = conns.insert(Conn {
                    client: res,
                    backend: -1,
                    dirs: [
                        Dir {
                            buf: vec![0; BUF].into(),
                            len: 0,
                            off: 0,
                            done: false,
                        },
                        Dir {
                            buf: vec![0; BUF].into(),
                            len: 0,
                            off: 0,
                            done: false,
                        },
                    ],
                    inflight: 1,
                    failed: false,
                    closing: false,
                });
                pending.push(
                    opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
                        .build()
                        .user_data(ud(slot, Op::Socket)),
                );
                continue;
            }
            let slot = (data >> 8) as usize;
            let op = op_of(data);
            let c = &mut conns[slot];
            c.inflight -= 1;
            match op {
                Op::Socket => {
                    if res < 0 {
                        c.failed = true;
                    } else {
                        c.backend = res;
                        unsafe {
                            libc::setsockopt(
                                res,
                                libc::IPPROTO_TCP,
                                libc::TCP_NODELAY,
                                &one as *const _ as *const _,
                                4,
                            )
                        };
                        pending.push(
                            opcode::Connect::new(
                                types::Fd(res),
                                baddr.as_ptr() as *const _,
                                baddr.len(),
                            )
                            .build()
                            .user_data(ud(slot, Op::Connect)),
                        );
                        c.inflight += 1;
                    }
                }
                Op::Connect => {
                    if res < 0 {
                        c.failed = true;
                    } else {
                        for (i, o) in [(0usize, Op::RecvC), (1, Op::RecvB)] {
                            let fd = if i == 0 { c.client } else { c.backend };
                            let d = &mut c.dirs[i];
                            pending.push(
                                opcode::Recv::new(types::Fd(fd), d.buf.as_mut_ptr(), BUF as u32)
                                    .build()
                                    .user_data(ud(slot, o)),
                            );
                            c.inflight += 1;
                        }
                    }
                }
                Op::RecvC | Op::RecvB => {
                    let i = if op == Op::RecvC { 0 } else { 1 };
                    let (dst, send) = if i == 0 {
                        (c.backend, Op::SendB)
                    } else {
                        (c.client, Op::SendC)
                    };
                    if res <= 0 || c.failed {
                        if res < 0 {
                            c.failed = true;
                        }
                        c.dirs[i].done = true;
                        if !c.failed {
                            // IORING_OP_SHUTDOWN is always punted to io-wq: a plain call.
                            unsafe { libc::shutdown(dst, libc::SHUT_WR) };
                        }
                    } else {
                        let d = &mut c.dirs[i];
                        d.len = res as usize;
                        d.off = 0;
                        pending.push(
                            opcode::Send::new(types::Fd(dst), d.buf.as_ptr(), d.len as u32)
                                .flags(libc::MSG_NOSIGNAL)
                                .build()
                                .user_data(ud(slot, send)),
                        );
                        c.inflight += 1;
                    }
                }
                Op::SendB | Op::SendC => {
                    let i = if op == Op::SendB { 0 } else { 1 };
                    let (src, dst, recv) = if i == 0 {
                        (c.client, c.backend, Op::RecvC)
                    } else {
                        (c.backend, c.client, Op::RecvB)
                    };
                    if res < 0 || c.failed {
                        c.failed = true;
                        c.dirs[i].done = true;
                    } else {
                        let d = &mut c.dirs[i];
                        d.off += res as usize;
                        if d.off < d.len {
                            pending.push(
                                opcode::Send::new(
                                    types::Fd(dst),
                                    unsafe { d.buf.as_ptr().add(d.off) },
                                    (d.len - d.off) as u32,
                                )
                                .flags(libc::MSG_NOSIGNAL)
                                .build()
                                .user_data(ud(slot, op)),
                            );
                        } else {
                            pending.push(
                                opcode::Recv::new(types::Fd(src), d.buf.as_mut_ptr(), BUF as u32)
                                    .build()
                                    .user_data(ud(slot, recv)),
                            );
                        }
                        c.inflight += 1;
                    }
                }
                Op::Close => {}
            }
            let c = &mut conns[slot];
            if c.failed && !c.closing && c.inflight > 0 {
                // wake pending receives
                for fd in [c.client, c.backend] {
                    if fd >= 0 {
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    }
                }
                c.closing = true;
            }
            if c.inflight == 0 && (c.failed || (c.dirs[0].done && c.dirs[1].done)) {
                if op == Op::Close {
                    conns.remove(slot);
                    continue;
                }
                let mut n = 0;
                for fd in [c.client, c.backend] {
                    if fd >= 0 {
                        pending.push(
                            opcode::Close::new(types::Fd(fd))
                                .build()
                                .user_data(ud(slot, Op::Close)),
                        );
                        n += 1;
                    }
                }
                c.inflight = n;
                c.client = -1;
                c.backend = -1;
                c.failed = true;
                if n == 0 {
                    conns.remove(slot);
                }
            }
        }
    }
}
