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
    results: Vec<(i32, u32)>,
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
                    slot.results.push((cqe.result(), cqe.flags()));
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

fn poll_result(key: usize, cx: &mut Context<'_>) -> Poll<(i32, u32)> {
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
        poll_result(self.key, cx).map(|(r, _)| r)
    }
}

/// A completion with its flags (which name the provided buffer a recv took).
struct Flagged {
    key: usize,
}

impl Future for Flagged {
    type Output = (i32, u32);
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, u32)> {
        poll_result(self.key, cx)
    }
}

// ---- provided buffers: a buffer ring the kernel picks a buffer from when data arrives ----

/// Buffers in the ring (a power of two) and the size of each.
pub const PROVIDED: u16 = 4096;
pub const PROVIDED_SIZE: usize = 16 * 1024;
const GROUP: u16 = 0;

struct Provided {
    entries: *mut types::BufRingEntry,
    buffers: *mut u8,
    tail: u16,
}

thread_local! {
    static PROVIDED_RING: RefCell<Option<Provided>> = const { RefCell::new(None) };
}

fn map(len: usize) -> *mut u8 {
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED);
    p.cast()
}

/// Registers this thread's buffer ring, every buffer in it. Call after `init`.
pub fn init_provided() {
    let entries = map(PROVIDED as usize * std::mem::size_of::<types::BufRingEntry>())
        .cast::<types::BufRingEntry>();
    let buffers = map(PROVIDED as usize * PROVIDED_SIZE);
    DRIVER.with(|d| {
        let d = d.borrow();
        unsafe {
            d.as_ref()
                .unwrap()
                .ring
                .submitter()
                .register_buf_ring_with_flags(entries as u64, PROVIDED, GROUP, 0)
                .unwrap();
        }
    });
    let mut p = Provided {
        entries,
        buffers,
        tail: 0,
    };
    for bid in 0..PROVIDED {
        p.push(bid);
    }
    PROVIDED_RING.with(|r| *r.borrow_mut() = Some(p));
}

impl Provided {
    fn push(&mut self, bid: u16) {
        unsafe {
            let e = &mut *self.entries.add((self.tail & (PROVIDED - 1)) as usize);
            e.set_addr(self.buffers.add(bid as usize * PROVIDED_SIZE) as u64);
            e.set_len(PROVIDED_SIZE as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail =
                types::BufRingEntry::tail(self.entries) as *const std::sync::atomic::AtomicU16;
            (*tail).store(self.tail, std::sync::atomic::Ordering::Release);
        }
    }
}

/// A recv whose buffer the kernel picks from the ring when data arrives: the result
/// and the buffer's id (`None` with no data: EOF, or an error such as ENOBUFS).
pub async fn recv_provided(fd: RawFd) -> (i32, Option<u16>) {
    let e = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), PROVIDED_SIZE as u32)
        .buf_group(GROUP)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT);
    let (r, flags) = Flagged {
        key: push(e, false),
    }
    .await;
    (r, cqueue::buffer_select(flags))
}

/// The bytes of provided buffer `bid`.
pub fn provided(bid: u16, len: usize) -> &'static [u8] {
    PROVIDED_RING.with(|r| {
        let r = r.borrow();
        let p = r.as_ref().unwrap();
        unsafe { std::slice::from_raw_parts(p.buffers.add(bid as usize * PROVIDED_SIZE), len) }
    })
}

/// Gives buffer `bid` back to the ring.
pub fn give_back(bid: u16) {
    PROVIDED_RING.with(|r| r.borrow_mut().as_mut().unwrap().push(bid));
}

/// A send of `len` bytes at `ptr`, which the caller keeps alive until it completes.
pub async fn send_raw(fd: RawFd, ptr: *const u8, len: usize) -> i32 {
    let e = opcode::Send::new(types::Fd(fd), ptr, len as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build();
    submit(e).await
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
    reaper_with(fd, turn).await
}

/// The task that calls `turn` whenever eventfd `fd` is signalled.
pub async fn reaper_with(fd: RawFd, turn: fn()) {
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

/// A one-shot readiness wait: the poll mask that was ready, or a negative errno.
pub async fn poll(fd: RawFd, mask: u32) -> i32 {
    submit(opcode::PollAdd::new(types::Fd(fd), mask).build()).await
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
