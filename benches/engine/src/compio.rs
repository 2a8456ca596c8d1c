//! The `compio` mode: the ring is compio-driver's `Proactor` (a well-kept crate with a
//! safe API: it owns each operation and its buffers until the kernel is done with them,
//! cancels on request, and manages a provided-buffer ring), driven exactly as ring.rs
//! drives its own: from a tokio current-thread runtime's park hook, with an eventfd in
//! tokio's reactor. The question it answers: does a crate's per-operation cost (a heap
//! key per operation, its bookkeeping) keep the gain the hand-written ring showed?
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZero;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use compio_buf::BufResult;
use compio_buf::IntoInner;
use compio_driver::op::{
    Accept, CloseSocket, Connect, CreateSocket, RecvFlags, RecvManaged, Send, SendFlags,
};
use compio_driver::{BufferPool, Key, OpCode, Proactor, PushEntry, TakeBuffer};
use socket2::{SockAddr, Socket};

thread_local! {
    static PROACTOR: RefCell<Option<Proactor>> = const { RefCell::new(None) };
    static POOL: RefCell<Option<BufferPool>> = const { RefCell::new(None) };
}

const BUFFERS: u16 = 4096;
const BUFFER_SIZE: usize = 16 * 1024;

/// Builds this thread's proactor; returns the eventfd to put in tokio's reactor.
pub fn init() -> RawFd {
    let efd = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
    )
    .unwrap();
    let fd = efd.as_raw_fd();
    std::mem::forget(efd);
    let mut p = Proactor::builder()
        .capacity(4096)
        .single_issuer(true)
        .defer_taskrun(true)
        .register_eventfd(fd)
        .buffer_pool_size(NonZero::new(BUFFERS).unwrap())
        .buffer_pool_buffer_len(BUFFER_SIZE)
        .build()
        .unwrap();
    let pool = p.buffer_pool().unwrap();
    PROACTOR.with(|c| *c.borrow_mut() = Some(p));
    POOL.with(|c| *c.borrow_mut() = Some(pool));
    fd
}

/// Submits what is queued and completes what is done (their wakers are woken).
pub fn turn() {
    PROACTOR.with(|c| {
        let _ = c.borrow_mut().as_mut().unwrap().poll(Some(Duration::ZERO));
    });
}

struct Op<T: OpCode> {
    key: Option<Key<T>>,
}

impl<T: OpCode> Unpin for Op<T> {}

impl<T: OpCode> Future for Op<T> {
    type Output = BufResult<usize, T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let key = self.key.take().unwrap();
        PROACTOR.with(|c| {
            let mut c = c.borrow_mut();
            let p = c.as_mut().unwrap();
            match p.pop(key) {
                PushEntry::Ready(r) => Poll::Ready(r),
                PushEntry::Pending(k) => {
                    p.update_waker(&k, cx.waker());
                    self.key = Some(k);
                    Poll::Pending
                }
            }
        })
    }
}

impl<T: OpCode> Drop for Op<T> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            PROACTOR.with(|c| {
                c.borrow_mut().as_mut().unwrap().cancel(k);
            });
        }
    }
}

async fn submit<T: OpCode + 'static>(op: T) -> BufResult<usize, T> {
    let pushed = PROACTOR.with(|c| c.borrow_mut().as_mut().unwrap().push(op));
    match pushed {
        PushEntry::Ready(r) => r,
        PushEntry::Pending(k) => Op { key: Some(k) }.await,
    }
}

async fn accept(l: &Rc<OwnedFd>) -> Option<Socket> {
    let BufResult(r, op) = submit(Accept::new(l.clone())).await;
    r.ok().map(|_| op.into_inner().0)
}

async fn connect(addr: SockAddr) -> Option<Socket> {
    let BufResult(r, op) = submit(CreateSocket::new(libc::AF_INET, libc::SOCK_STREAM, 0)).await;
    r.ok()?;
    let s = Rc::new(op.into_inner());
    let BufResult(r, _) = submit(Connect::new(s.clone(), addr)).await;
    let s = Rc::try_unwrap(s).ok().unwrap();
    if r.is_err() {
        close(s).await;
        return None;
    }
    Some(s)
}

async fn close(s: Socket) {
    let _ = submit(CloseSocket::new(OwnedFd::from(s))).await;
}

/// recv from a provided buffer, sent on as it is, back to the ring on drop.
async fn pump(from: Rc<Socket>, to: Rc<Socket>) {
    loop {
        let pool = POOL.with(|p| p.borrow().as_ref().unwrap().clone());
        let op = RecvManaged::new(from.clone(), &pool, BUFFER_SIZE, RecvFlags::empty()).unwrap();
        let BufResult(r, op) = submit(op).await;
        let n = match r {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(mut buf) = op.take_buffer() else {
            break;
        };
        // SAFETY: the kernel wrote n bytes into the buffer it picked.
        unsafe { compio_buf::SetLen::set_len(&mut buf, n) };
        let BufResult(w, op) = submit(Send::new(to.clone(), buf, SendFlags::NOSIGNAL)).await;
        let mut sent = match w {
            Ok(w) if w > 0 => w,
            _ => return,
        };
        // A partial send (rare on loopback): the rest goes from a copy, so the pool's
        // buffer is back at once.
        let mut rest = op.into_inner()[sent..n].to_vec();
        while sent < n {
            let BufResult(w, op) = submit(Send::new(to.clone(), rest, SendFlags::NOSIGNAL)).await;
            rest = op.into_inner();
            match w {
                Ok(w) if w > 0 => {
                    sent += w;
                    rest.drain(..w);
                }
                _ => return,
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

pub fn proxy(l: std::net::TcpListener, backend: SocketAddr) {
    let fd = init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(turn)
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        tokio::task::spawn_local(crate::ring::reaper_with(fd, turn));
        let l = Rc::new(OwnedFd::from(l));
        loop {
            let Some(c) = accept(&l).await else {
                continue;
            };
            tokio::task::spawn_local(async move {
                let Some(b) = connect(SockAddr::from(backend)).await else {
                    close(c).await;
                    return;
                };
                let _ = b.set_tcp_nodelay(true);
                let (c, b) = (Rc::new(c), Rc::new(b));
                tokio::join!(pump(c.clone(), b.clone()), pump(b.clone(), c.clone()));
                close(Rc::try_unwrap(c).ok().unwrap()).await;
                close(Rc::try_unwrap(b).ok().unwrap()).await;
            });
        }
    });
}
