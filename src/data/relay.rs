//! The bidirectional byte relay between a client and a backend.
//!
//! - Each direction waits for readiness *before* borrowing a buffer, so an idle
//!   connection holds no buffer at all; a buffer is held only while its bytes are being
//!   written to a peer that is slow to read.
//! - Half-close: when one side sends FIN, the relay passes it on with `shutdown(Write)`
//!   and keeps the other direction flowing. The relay ends when both directions have
//!   ended.
//! - An abortive close (RST) or error on one side ends the relay at once, and the other
//!   side is reset too (SO_LINGER 0), so neither peer waits on a dead connection. Every
//!   other early end (timeouts, lifetime, removal, shutdown) closes with FIN, so bytes
//!   already relayed are still delivered.
//! - The idle timeout counts from the last byte moved in either direction.
//! - With TLS on either side, [`relay_streams`] does the same through the streams'
//!   `AsyncRead`/`AsyncWrite`, with a 16 KiB buffer (one TLS record) per direction held
//!   for the connection's life: the TLS state keeps decrypted bytes that readiness of
//!   the socket cannot show.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;

pub use crate::metrics::End;
use crate::shutdown::Stopped;
use crate::stream::Stream;
use crate::upstream::{BACKEND_KEEPALIVE_AFTER, backend_keepalive};

/// Size of one relay buffer, and so the most one write sends. It stays under one
/// loopback segment (MTU 65536, MSS 65,483 bytes): a 64 KiB write went out as a
/// 65,483-byte segment and a 53-byte one, and one bulk stream moved 13.5 Gbit/s at
/// 0.46 s of CPU per GB against 23.4 at 0.18 with 48 KiB (BENCHMARKS.md, "The relay's
/// write size (session 13)"). It costs nothing while idle.
const BUFFER_SIZE: usize = 48 * 1024;
/// Buffers kept per worker thread for reuse; the rest are freed.
const POOL_PER_THREAD: usize = 64;
/// Buffer per direction of a TLS relay: one TLS record of plaintext.
const STREAM_BUFFER_SIZE: usize = 16 * 1024;
/// Bytes moved per splice(2), under a pipe's default capacity on Linux (16 pages), and
/// under one loopback segment for the reason given at [`BUFFER_SIZE`].
const PIPE_SIZE: usize = 48 * 1024;
/// Empty pipes kept per worker thread for reuse; two descriptors each.
const PIPES_PER_THREAD: usize = 16;
/// Never block on the pipe; move pages rather than copy them where the kernel can.
const SPLICE_FLAGS: SpliceFlags = SpliceFlags::NONBLOCK.union(SpliceFlags::MOVE);

/// What the relay did.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    pub client_to_backend: u64,
    pub backend_to_client: u64,
}

/// Where each direction adds what it moves.
pub struct Counters<'a> {
    pub client_to_backend: &'a IntCounter,
    pub backend_to_client: &'a IntCounter,
}

/// Time limits on one relay. The plain relay keeps a copy: a connection without a
/// lifetime then holds nothing of its own for them outside its task (the idle timeout
/// is its upstream's).
#[derive(Clone, Copy)]
pub struct Limits {
    /// Close when no byte has moved either way for this long.
    pub idle: Duration,
    /// Close at this time, if set (the upstream's `max_lifetime`).
    pub lifetime_end: Option<Instant>,
}

impl Limits {
    /// The time the relay must end if nothing moves after `last`.
    fn deadline(&self, last: Instant) -> Instant {
        let idle = last + self.idle;
        self.lifetime_end.map_or(idle, |end| end.min(idle))
    }
}

/// What can end a relay from outside.
pub struct Stops<'a> {
    /// The shutdown drain's deadline.
    pub shutdown: &'a CancellationToken,
    /// The backend's sessions (an operator's close), a child of its removal by a
    /// reload, itself a child of `shutdown`: the relay waits on this one token for all
    /// three, and tells them apart by which of the parents is cancelled.
    pub removed: &'a CancellationToken,
    /// The backend's removal by a reload (`Backend::removed`).
    pub retired: &'a CancellationToken,
}

/// Why a relay was stopped, once `Stops::removed` has fired.
fn stopped_by(shutdown: &CancellationToken, retired: &CancellationToken) -> End {
    if shutdown.is_cancelled() {
        End::Shutdown
    } else if retired.is_cancelled() {
        End::BackendRemoved
    } else {
        End::BackendClosed
    }
}

/// Relays until both directions have closed, one side resets, a limit passes, or one
/// of `stops` is cancelled. With `splice`, bytes move through a pipe with splice(2)
/// and never enter user space; without, through a pooled buffer.
pub fn relay<'a>(
    client: &'a TcpStream,
    backend: &'a TcpStream,
    limits: &Limits,
    stops: Stops<'a>,
    counters: Counters<'a>,
    splice: bool,
) -> Relay<'a> {
    let now = Instant::now();
    Relay {
        client,
        backend,
        up: Half::new(splice),
        down: Half::new(splice),
        counters,
        limits: *limits,
        last: now,
        // First at the keepalive point (see the timer's loop in `step`), if earlier.
        timer: sleep_until(limits.deadline(now).min(now + BACKEND_KEEPALIVE_AFTER)),
        stopped: Stopped::new(stops.removed),
        shutdown: stops.shutdown,
        retired: stops.retired,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`relay`]: one hand-written poll loop drives both directions and
    /// every stop, rather than a future per direction under `select!`. This is the
    /// state an open connection holds for its whole life, so it is kept to two
    /// [`Half`]s, one timer and one cancellation wait.
    pub struct Relay<'a> {
        client: &'a TcpStream,
        backend: &'a TcpStream,
        up: Half,
        down: Half,
        counters: Counters<'a>,
        limits: Limits,
        // When a byte last moved either way.
        last: Instant,
        // Fires at the idle or lifetime deadline, whichever is first; the first
        // firing comes at BACKEND_KEEPALIVE_AFTER at the latest.
        #[pin]
        timer: Sleep,
        shutdown: &'a CancellationToken,
        retired: &'a CancellationToken,
        // Fires on an operator's close, the backend's removal or the shutdown cut.
        #[pin]
        stopped: Stopped<'a>,
    }
}

impl Future for Relay<'_> {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let end = match self.as_mut().step(cx) {
            Poll::Ready(end) => end,
            Poll::Pending => return Poll::Pending,
        };
        if matches!(end, End::ClientReset | End::BackendReset) {
            // Pass the reset on: the other peer should not wait on a dead connection.
            reset(self.client);
            reset(self.backend);
        }
        // Any other end (a timeout, the lifetime, a removed backend, the shutdown cut)
        // closes with FIN when the sockets drop, so bytes already relayed into the
        // kernel's buffers still reach a slow reader; an RST would throw them away.
        // Bytes still in a half's buffer or pipe are dropped with it.
        Poll::Ready(Outcome {
            end,
            client_to_backend: self.up.moved,
            backend_to_client: self.down.moved,
        })
    }
}

impl Relay<'_> {
    fn step(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let mut this = self.as_mut().project();
        if this.stopped.as_mut().poll(cx).is_ready() {
            return Poll::Ready(stopped_by(this.shutdown, this.retired));
        }
        let moved_before = this.up.moved + this.down.moved;
        let (client, backend) = (*this.client, *this.backend);
        let down_done = this.down.done;
        if let Err(side) = this.up.poll(
            cx,
            client,
            backend,
            this.counters.client_to_backend,
            down_done,
        ) {
            return Poll::Ready(side.reset_end());
        }
        let up_done = this.up.done;
        if let Err(side) = this.down.poll(
            cx,
            backend,
            client,
            this.counters.backend_to_client,
            up_done,
        ) {
            // The backend was the source of this direction, the client the sink.
            return Poll::Ready(side.flip().reset_end());
        }
        if this.up.done && this.down.done {
            return Poll::Ready(End::Closed);
        }
        if this.up.moved + this.down.moved != moved_before {
            *this.last = Instant::now();
        }
        // The timer is moved only when it fires, not on every byte: it then sleeps on
        // to the deadline that the last byte moved gives.
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if this.limits.lifetime_end.is_some_and(|end| now >= end) {
                return Poll::Ready(End::MaxLifetime);
            }
            if now >= *this.last + this.limits.idle {
                return Poll::Ready(End::IdleTimeout);
            }
            // The first firing comes at BACKEND_KEEPALIVE_AFTER at the latest: the
            // backend socket's keepalive is turned on then, on a connection that lived
            // that long. Later firings (about once per idle timeout) set it again,
            // which costs less than remembering that it is set.
            backend_keepalive(this.backend);
            this.timer.as_mut().reset(this.limits.deadline(*this.last));
        }
        Poll::Pending
    }
}

/// One direction of a plain relay: bytes read from its source and not yet written to
/// its sink are held in `pending`, and only then.
struct Half {
    pending: Option<Chunk>,
    splice: bool,
    /// The source sent FIN and it was passed on.
    done: bool,
    moved: u64,
}

/// Bytes in flight in one direction: a borrowed buffer, or a borrowed pipe. Offsets
/// are `u32` (a chunk is at most 48 KiB) to keep every open connection's state small.
/// An emptied chunk is handed back to its pool with [`Chunk::give_back`]; one dropped
/// with bytes still in it is freed (a pipe holding bytes is never reused).
enum Chunk {
    Buffer { buf: Buffer, start: u32, end: u32 },
    Pipe { pipe: Pipe, len: u32 },
}

const _: () = assert!(BUFFER_SIZE <= u32::MAX as usize && PIPE_SIZE <= u32::MAX as usize);
/// The loopback interface's MSS (MTU 65536): one write of the relay must fit in one
/// segment of it (see [`BUFFER_SIZE`]).
const LOOPBACK_MSS: usize = 65_483;
const _: () = assert!(BUFFER_SIZE < LOOPBACK_MSS && PIPE_SIZE < LOOPBACK_MSS);

impl Half {
    fn new(splice: bool) -> Half {
        Half {
            pending: None,
            splice,
            done: false,
            moved: 0,
        }
    }

    /// Moves what `src` has to `dst` until one of them would block (its waker is then
    /// registered), `src` has sent FIN, or either fails. The coop budget of the task
    /// bounds how long one call may run. `other_done`: the other direction has ended,
    /// so this one's FIN ends the relay.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &IntCounter,
        other_done: bool,
    ) -> Result<(), Failed> {
        let mut written = 0u64;
        let result = loop {
            if let Some(chunk) = &mut self.pending {
                match dst.poll_write_ready(cx) {
                    Poll::Pending => break Ok(()),
                    Poll::Ready(Err(_)) => break Err(Failed::Sink),
                    Poll::Ready(Ok(())) => {}
                }
                match chunk.write_to(dst) {
                    Ok(n) => {
                        written += n as u64;
                        if chunk.is_empty()
                            && let Some(chunk) = self.pending.take()
                        {
                            chunk.give_back();
                        }
                    }
                    // Readiness is cleared: the next poll_write_ready waits.
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => break Err(Failed::Sink),
                }
                continue;
            }
            if self.done {
                break Ok(());
            }
            match src.poll_read_ready(cx) {
                Poll::Pending => break Ok(()),
                Poll::Ready(Err(_)) => break Err(Failed::Source),
                Poll::Ready(Ok(())) => {}
            }
            match Chunk::read_from(src, self.splice) {
                Ok(Some(chunk)) => self.pending = Some(chunk),
                Ok(None) => {
                    // Pass the FIN on. When the other direction has ended too, the
                    // relay ends and closing `dst` sends the FIN: everything it
                    // received was read, so the close is as clean as a shutdown,
                    // and one system call fewer. ENOTCONN here means the sink
                    // already went away; the other direction will see that itself.
                    if !other_done {
                        let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                    }
                    self.done = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => break Err(Failed::Source),
            }
        };
        // Counted once per poll rather than per write: one atomic add on a counter the
        // whole listener shares.
        self.moved += written;
        counter.inc_by(written);
        result
    }
}

impl Chunk {
    /// Reads what `src` has into a borrowed buffer or pipe: `None` at FIN. The buffer
    /// or pipe goes back to the pool if nothing was read.
    fn read_from(src: &TcpStream, splice: bool) -> io::Result<Option<Chunk>> {
        let (chunk, read) = match splice.then(Pipe::take).flatten() {
            Some(pipe) => {
                let read = fill(src, Interest::READABLE, PIPE_SIZE, |max| {
                    rustix::pipe::splice(src, None, &pipe.write, None, max, SPLICE_FLAGS)
                        .map_err(io::Error::from)
                });
                (Chunk::Pipe { pipe, len: 0 }, read)
            }
            None => {
                let mut buf = Buffer::from_pool();
                let read = fill(src, Interest::READABLE, BUFFER_SIZE, |max| {
                    rustix::io::read(src, &mut buf[..max]).map_err(io::Error::from)
                });
                (
                    Chunk::Buffer {
                        buf,
                        start: 0,
                        end: 0,
                    },
                    read,
                )
            }
        };
        match read {
            Ok(n) if n > 0 => Ok(Some(chunk.filled(n as u32))),
            other => {
                chunk.give_back();
                other.map(|_| None)
            }
        }
    }

    fn filled(self, n: u32) -> Chunk {
        match self {
            Chunk::Buffer { buf, .. } => Chunk::Buffer {
                buf,
                start: 0,
                end: n,
            },
            Chunk::Pipe { pipe, .. } => Chunk::Pipe { pipe, len: n },
        }
    }

    fn give_back(self) {
        match self {
            Chunk::Buffer { buf, .. } => buf.give_back(),
            Chunk::Pipe { pipe, .. } => pipe.give_back(),
        }
    }

    /// Writes what it can of the chunk to `dst`.
    fn write_to(&mut self, dst: &TcpStream) -> io::Result<usize> {
        match self {
            Chunk::Buffer { buf, start, end } => {
                let data = &buf[*start as usize..*end as usize];
                let n = fill(dst, Interest::WRITABLE, data.len(), |max| {
                    rustix::io::write(dst, &data[..max]).map_err(io::Error::from)
                })?;
                *start += n as u32;
                Ok(n)
            }
            Chunk::Pipe { pipe, len } => {
                let n = fill(dst, Interest::WRITABLE, *len as usize, |max| {
                    rustix::pipe::splice(&pipe.read, None, dst, None, max, SPLICE_FLAGS)
                        .map_err(io::Error::from)
                })?;
                *len -= n as u32;
                Ok(n)
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Chunk::Buffer { start, end, .. } => start == end,
            Chunk::Pipe { len, .. } => *len == 0,
        }
    }
}

/// Runs one read or write of at most `max` bytes on `socket` through tokio's readiness.
/// A transfer shorter than `max` means the socket is drained (or full): readiness is
/// then cleared too, as tokio's own `poll_read` does, so the next wait goes to epoll
/// instead of costing a system call that would only return EAGAIN.
fn fill(
    socket: &TcpStream,
    interest: Interest,
    max: usize,
    op: impl FnOnce(usize) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut short = None;
    let result = socket.try_io(interest, || {
        let n = op(max)?;
        if n > 0 && n < max {
            short = Some(n);
            // tokio clears readiness only for WouldBlock; the count is kept in `short`.
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, short) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

/// [`relay`] for streams with TLS on either side.
pub async fn relay_streams<C: Stream, B: Stream>(
    client: C,
    backend: B,
    limits: &Limits,
    stops: Stops<'_>,
    counters: Counters<'_>,
) -> Outcome {
    let clock = IdleClock::new();
    let up = Direction::default();
    let down = Direction::default();
    // A TLS connection's handshake costs far more than these four system calls: they
    // are made here rather than timed as in the plain relay.
    backend_keepalive(backend.tcp());
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let end = {
        let c2b = pump_stream(
            &mut client_rx,
            &mut backend_tx,
            &up,
            &clock,
            counters.client_to_backend,
        );
        let b2c = pump_stream(
            &mut backend_rx,
            &mut client_tx,
            &down,
            &clock,
            counters.backend_to_client,
        );
        tokio::pin!(c2b, b2c);
        drive(c2b, b2c, &clock, limits, stops).await
    };
    if matches!(end, End::ClientReset | End::BackendReset) {
        reset(client_rx.unsplit(client_tx).tcp());
        reset(backend_rx.unsplit(backend_tx).tcp());
    }
    Outcome::of(end, &up, &down)
}

/// Runs both directions until both have finished or something ends the relay.
async fn drive(
    c2b: impl Future<Output = Result<(), Failed>>,
    b2c: impl Future<Output = Result<(), Failed>>,
    clock: &IdleClock,
    limits: &Limits,
    stops: Stops<'_>,
) -> End {
    let idle = clock.expired(limits.idle);
    let stopped = Stopped::new(stops.removed);
    let lifetime = async {
        match limits.lifetime_end {
            Some(end) => sleep_until(end).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(c2b, b2c, idle, stopped, lifetime);

    let (mut c2b_done, mut b2c_done) = (false, false);
    loop {
        tokio::select! {
            r = &mut c2b, if !c2b_done => match r {
                Ok(()) => c2b_done = true,
                Err(side) => break side.reset_end(),
            },
            r = &mut b2c, if !b2c_done => match r {
                // The backend was the source of this direction, the client the sink.
                Ok(()) => b2c_done = true,
                Err(side) => break side.flip().reset_end(),
            },
            () = &mut idle => break End::IdleTimeout,
            () = &mut lifetime => break End::MaxLifetime,
            () = &mut stopped => break stopped_by(stops.shutdown, stops.retired),
        }
        if c2b_done && b2c_done {
            break End::Closed;
        }
    }
}

impl Outcome {
    fn of(end: End, up: &Direction, down: &Direction) -> Outcome {
        Outcome {
            end,
            client_to_backend: up.moved.load(Ordering::Relaxed),
            backend_to_client: down.moved.load(Ordering::Relaxed),
        }
    }
}

/// Bytes moved in one direction of [`relay_streams`], readable even if the relay ends
/// mid-write.
#[derive(Default)]
struct Direction {
    moved: AtomicU64,
}

/// Which socket of a direction failed.
#[derive(Debug, Clone, Copy)]
enum Failed {
    Source,
    Sink,
}

impl Failed {
    /// Seen from the client-to-backend direction: the source is the client.
    fn reset_end(self) -> End {
        match self {
            Failed::Source => End::ClientReset,
            Failed::Sink => End::BackendReset,
        }
    }

    fn flip(self) -> Failed {
        match self {
            Failed::Source => Failed::Sink,
            Failed::Sink => Failed::Source,
        }
    }
}

/// One direction of [`relay_streams`], through `AsyncRead`/`AsyncWrite`; the end of `src` is passed on with
/// `shutdown`, which for TLS sends close_notify and then FIN.
async fn pump_stream<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut R,
    dst: &mut W,
    dir: &Direction,
    clock: &IdleClock,
    counter: &IntCounter,
) -> Result<(), Failed> {
    let mut buf = vec![0u8; STREAM_BUFFER_SIZE];
    loop {
        let n = match src.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closed its socket without close_notify: many clients do,
            // and the bytes before it were whole records, so it is an ordinary end.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => 0,
            Err(_) => return Err(Failed::Source),
        };
        if n == 0 {
            let _ = dst.shutdown().await;
            return Ok(());
        }
        clock.touch();
        let mut data = &buf[..n];
        while !data.is_empty() {
            let written = dst.write(data).await.map_err(|_| Failed::Sink)?;
            if written == 0 {
                return Err(Failed::Sink);
            }
            data = &data[written..];
            clock.touch();
            dir.moved.fetch_add(written as u64, Ordering::Relaxed);
            counter.inc_by(written as u64);
        }
        dst.flush().await.map_err(|_| Failed::Sink)?;
    }
}

/// Make the coming close an RST rather than a FIN.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// The time of the last byte moved, shared by both directions.
struct IdleClock {
    origin: Instant,
    /// Milliseconds after `origin`.
    last: AtomicU64,
}

impl IdleClock {
    fn new() -> IdleClock {
        IdleClock {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `limit`.
    async fn expired(&self, limit: Duration) {
        loop {
            let deadline = self.last() + limit;
            sleep_until(deadline).await;
            if self.last() + limit <= Instant::now() {
                return;
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
}

/// A relay buffer, borrowed from the worker thread's pool.
type Buffer = Box<[u8; BUFFER_SIZE]>;

/// What the relay borrows from a per-thread pool while bytes are in flight.
trait Pooled: Sized {
    fn from_pool() -> Self;
    /// Returns it to the pool, or frees it when the pool is full.
    fn give_back(self);
}

impl Pooled for Buffer {
    fn from_pool() -> Buffer {
        POOL.with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| Box::new([0u8; BUFFER_SIZE]))
    }

    fn give_back(self) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_PER_THREAD {
                p.push(self);
            }
        });
    }
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe for splice(2), borrowed from the worker thread's pool while bytes are in it.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A pipe from the pool, or a new one; `None` when none can be made (out of
    /// descriptors), and the caller copies through a buffer instead.
    fn take() -> Option<Pipe> {
        if let Some(pipe) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Some(pipe);
        }
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .map_err(|e| tracing::debug!(error = %e, "cannot make a pipe; copying instead"))
            .ok()?;
        Some(Pipe { read, write })
    }

    /// Returns an empty pipe to the pool, or closes it when the pool is full.
    fn give_back(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < PIPES_PER_THREAD {
                p.push(self);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Two connected loopback sockets: (the side the relay holds, the peer).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (peer, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (accepted.unwrap().0, peer.unwrap())
    }

    struct Ends {
        client: TcpStream,
        backend: TcpStream,
        relayed: tokio::task::JoinHandle<(Outcome, u64, u64)>,
    }

    /// A relay between two socket pairs; returns the client's and the backend's peers.
    async fn start(splice: bool, idle: Duration, stop: CancellationToken) -> Ends {
        let (client_side, client) = pair().await;
        let (backend_side, backend) = pair().await;
        let relayed = tokio::spawn(async move {
            let (up, down) = (
                IntCounter::new("u", "u").unwrap(),
                IntCounter::new("d", "d").unwrap(),
            );
            let limits = Limits {
                idle,
                lifetime_end: None,
            };
            let removed = stop.child_token();
            let outcome = relay(
                &client_side,
                &backend_side,
                &limits,
                Stops {
                    shutdown: &stop,
                    removed: &removed,
                    retired: &removed,
                },
                Counters {
                    client_to_backend: &up,
                    backend_to_client: &down,
                },
                splice,
            )
            .await;
            (outcome, up.get(), down.get())
        });
        Ends {
            client,
            backend,
            relayed,
        }
    }

    /// The client's FIN reaches the backend while the backend's reply still flows back;
    /// the relay ends once both directions are closed, with every byte counted.
    #[tokio::test]
    async fn half_close_passes_the_fin_and_the_other_direction_keeps_flowing() {
        for splice in [false, true] {
            let mut e = start(splice, Duration::from_secs(60), CancellationToken::new()).await;
            let request = vec![7u8; 100_000];
            e.client.write_all(&request).await.unwrap();
            e.client.shutdown().await.unwrap();
            let mut got = Vec::new();
            e.backend.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, request, "splice={splice}");
            let reply = vec![9u8; 300_000];
            e.backend.write_all(&reply).await.unwrap();
            e.backend.shutdown().await.unwrap();
            let mut back = Vec::new();
            e.client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back.len(), reply.len());
            let (outcome, up, down) = e.relayed.await.unwrap();
            assert_eq!(outcome.end, End::Closed);
            assert_eq!(
                (outcome.client_to_backend, outcome.backend_to_client),
                (100_000, 300_000)
            );
            assert_eq!(
                (up, down),
                (100_000, 300_000),
                "counters agree with the outcome"
            );
        }
    }

    #[tokio::test]
    async fn a_quiet_relay_ends_at_its_idle_timeout_and_a_cut_ends_it_at_once() {
        let e = start(false, Duration::from_millis(30), CancellationToken::new()).await;
        assert_eq!(e.relayed.await.unwrap().0.end, End::IdleTimeout);
        drop((e.client, e.backend));

        let stop = CancellationToken::new();
        let e = start(false, Duration::from_secs(60), stop.clone()).await;
        crate::shutdown::cancel(&stop);
        assert_eq!(e.relayed.await.unwrap().0.end, End::Shutdown);
    }

    /// The backend socket's keepalive, as the kernel has it: on, idle time, interval,
    /// count.
    fn probes(s: &TcpStream) -> (bool, Duration, Duration, u32) {
        use rustix::net::sockopt;
        (
            sockopt::socket_keepalive(s).unwrap(),
            sockopt::tcp_keepidle(s).unwrap(),
            sockopt::tcp_keepintvl(s).unwrap(),
            sockopt::tcp_keepcnt(s).unwrap(),
        )
    }

    /// A relay that lives past BACKEND_KEEPALIVE_AFTER turns keepalive on on its backend
    /// socket (the connect sets none of it), and is not ended by it. The clock is
    /// tokio's paused one; the sockets are real.
    #[tokio::test(start_paused = true)]
    async fn a_relay_that_lives_a_minute_sets_its_backend_keepalive_probes() {
        for splice in [false, true] {
            let (client_side, mut client) = pair().await;
            let (backend_side, mut backend) = pair().await;
            let (up, down) = (
                IntCounter::new("u", "u").unwrap(),
                IntCounter::new("d", "d").unwrap(),
            );
            let limits = Limits {
                idle: Duration::from_secs(3600),
                lifetime_end: None,
            };
            let stop = CancellationToken::new();
            let counters = Counters {
                client_to_backend: &up,
                backend_to_client: &down,
            };
            let stops = Stops {
                shutdown: &stop,
                removed: &stop,
                retired: &stop,
            };
            let relayed = relay(
                &client_side,
                &backend_side,
                &limits,
                stops,
                counters,
                splice,
            );
            tokio::pin!(relayed);
            let before = probes(&backend_side);
            assert!(!before.0, "off before the relay sets it");
            let checks = async {
                client.write_all(b"ping").await.unwrap();
                assert_eq!(read_exactly(&mut backend, 4).await, b"ping");
                tokio::time::sleep(BACKEND_KEEPALIVE_AFTER - Duration::from_secs(1)).await;
                assert_eq!(probes(&backend_side), before, "not before the point");
                tokio::time::sleep(Duration::from_secs(2)).await;
                backend.write_all(b"pong").await.unwrap();
                assert_eq!(read_exactly(&mut client, 4).await, b"pong");
            };
            tokio::select! {
                o = &mut relayed => panic!("the relay ended: {:?}", o.end),
                () = checks => {}
            }
            assert_eq!(
                probes(&backend_side),
                (true, Duration::from_secs(120), Duration::from_secs(15), 4),
                "splice={splice}"
            );
        }
    }

    async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn a_backend_reset_ends_the_relay_as_a_backend_reset() {
        let e = start(false, Duration::from_secs(60), CancellationToken::new()).await;
        socket2::SockRef::from(&e.backend)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(e.backend);
        assert_eq!(e.relayed.await.unwrap().0.end, End::BackendReset);
    }
}
