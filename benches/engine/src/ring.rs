//! A ring driven from inside a tokio current-thread runtime: operations are queued on
//! the ring without a system call, submitted together (and their completions reaped) in
//! the runtime's `on_thread_park` hook, just before tokio's epoll_wait; the ring's fd is
//! registered with tokio's reactor so a completion that lands while the thread sleeps
//! wakes it. Futures own their buffers until the completion arrives.
use std::cell::RefCell;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

struct Slot {
    waker: Option<Waker>,
    results: Vec<i32>,
    /// whether more completions follow (multishot)
    multishot: bool,
}

pub struct Driver {
    ring: IoUring,
    slots: slab::Slab<Slot>,
    backlog: Vec<squeue::Entry>,
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

pub fn init() -> RawFd {
    let ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)
        .unwrap();
    // A DEFER_TASKRUN ring's own fd does not become readable when work is queued for
    // the submitter (seen here: epoll_wait slept through an accepted connection); the
    // kernel signals a registered eventfd instead, so that fd goes into tokio's reactor.
    // Each signal is a new edge for the edge-triggered epoll, so it is never read.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    ring.submitter().register_eventfd(fd).unwrap();
    DRIVER.with(|d| {
        *d.borrow_mut() = Some(Driver {
            ring,
            slots: slab::Slab::new(),
            backlog: Vec::new(),
        })
    });
    fd
}

/// Submits what is queued and wakes the tasks whose operations completed. Called from
/// the park hook and when the ring's fd is readable.
pub fn turn() {
    DRIVER.with(|d| {
        let mut d = d.borrow_mut();
        let d = d.as_mut().unwrap();
        loop {
            {
                let mut sq = d.ring.submission();
                while let Some(e) = d.backlog.last() {
                    if unsafe { sq.push(e) }.is_err() {
                        break;
                    }
                    d.backlog.pop();
                }
            }
            // An enter carrying GETEVENTS (min_complete 0: no wait) runs the deferred task
            // work, which is what posts completions on a DEFER_TASKRUN ring.
            let queued = d.ring.submission().len() as u32;
            let _ = unsafe {
                d.ring.submitter().enter::<libc::sigset_t>(
                    queued,
                    0,
                    io_uring::EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            let mut woke = false;
            for cqe in d.ring.completion() {
                let key = cqe.user_data() as usize;
                let more = cqueue::more(cqe.flags());
                if let Some(slot) = d.slots.get_mut(key) {
                    slot.results.push(cqe.result());
                    if !more {
                        slot.multishot = false;
                    }
                    if let Some(w) = slot.waker.take() {
                        w.wake();
                    }
                    woke = true;
                }
            }
            if d.backlog.is_empty() || !woke {
                break;
            }
        }
    });
}

fn push(entry: squeue::Entry, multishot: bool) -> usize {
    DRIVER.with(|d| {
        let mut d = d.borrow_mut();
        let d = d.as_mut().unwrap();
        let key = d.slots.insert(Slot {
            waker: None,
            results: Vec::new(),
            multishot,
        });
        let entry = entry.user_data(key as u64);
        let mut sq = d.ring.submission();
        if unsafe { sq.push(&entry) }.is_err() {
            drop(sq);
            d.backlog.insert(0, entry);
        }
        key
    })
}

fn poll_result(key: usize, cx: &mut Context<'_>) -> Poll<i32> {
    DRIVER.with(|d| {
        let mut d = d.borrow_mut();
        let d = d.as_mut().unwrap();
        let slot = &mut d.slots[key];
        if slot.results.is_empty() {
            slot.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let r = slot.results.remove(0);
        if !slot.multishot && slot.results.is_empty() {
            d.slots.remove(key);
        }
        Poll::Ready(r)
    })
}

/// One operation's completion (no cancellation: the experiment never drops one early).
pub struct Completion {
    key: usize,
}

impl Future for Completion {
    type Output = i32;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        poll_result(self.key, cx)
    }
}

pub fn submit(entry: squeue::Entry) -> Completion {
    Completion {
        key: push(entry, false),
    }
}

/// A multishot accept: each `next` is one accepted fd (or a negative errno).
pub struct Accepts {
    key: usize,
}

impl Accepts {
    pub fn new(listener: RawFd) -> Accepts {
        let e = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build();
        Accepts { key: push(e, true) }
    }
    pub fn next(&self) -> Completion {
        Completion { key: self.key }
    }
}

/// The task that turns the ring when its eventfd is signalled.
pub async fn reaper(fd: RawFd) {
    struct Fd(RawFd);
    impl AsRawFd for Fd {
        fn as_raw_fd(&self) -> RawFd {
            self.0
        }
    }
    // SAFETY: the eventfd lives as long as the thread's driver, which outlives this task.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(Fd(fd), tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
    .unwrap();
    loop {
        let mut g = afd.readable().await.unwrap();
        g.clear_ready();
        turn();
    }
}

pub async fn recv(fd: RawFd, mut buf: Vec<u8>) -> (i32, Vec<u8>) {
    let e = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32).build();
    let r = submit(e).await;
    (r, buf)
}

pub async fn send(fd: RawFd, buf: Vec<u8>, off: usize, len: usize) -> (i32, Vec<u8>) {
    let e = opcode::Send::new(types::Fd(fd), buf[off..].as_ptr(), (len - off) as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build();
    let r = submit(e).await;
    (r, buf)
}

pub async fn close(fd: RawFd) {
    submit(opcode::Close::new(types::Fd(fd)).build()).await;
}

pub async fn connect(addr: Rc<socket2::SockAddr>) -> Result<RawFd, i32> {
    let s = submit(
        opcode::Socket::new(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
        .build(),
    )
    .await;
    if s < 0 {
        return Err(s);
    }
    let r =
        submit(opcode::Connect::new(types::Fd(s), addr.as_ptr().cast(), addr.len()).build()).await;
    if r < 0 {
        close(s).await;
        return Err(r);
    }
    Ok(s)
}
