//! The wait queue of an upstream whose backends take only so many connections
//! (`max_connections_per_backend`).
//!
//! Strict FIFO: a client that finds every eligible backend full, or finds others already
//! waiting, joins the back. A freed slot is handed directly to the oldest waiter (the
//! slot is taken for it before it wakes), so no newcomer can overtake it and no herd
//! wakes. A waiter that leaves (timeout, client gone) is removed at once; a slot handed
//! to it in the meantime is passed on.
//!
//! One mutex per upstream guards the waiters; it is taken only by upstreams with a
//! per-backend limit, and held for a scan of the backends.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{Histogram, IntGauge};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

use crate::upstream::{Backend, ConnectError, Upstream};

pub struct Queue {
    /// Bounds from the latest config (a reload may change them).
    max: AtomicUsize,
    timeout_ms: AtomicU64,
    waiters: Mutex<Waiters>,
    length: IntGauge,
    wait: Histogram,
}

#[derive(Default)]
struct Waiters {
    queue: VecDeque<Waiter>,
    next_id: u64,
}

struct Waiter {
    id: u64,
    client: SocketAddr,
    /// Backends this client already failed to connect to.
    tried: Vec<SocketAddr>,
    /// Receives the backend whose slot was taken for this waiter.
    slot: oneshot::Sender<Arc<Backend>>,
}

impl Queue {
    pub fn new(max: usize, timeout: Duration, length: IntGauge, wait: Histogram) -> Queue {
        Queue {
            max: AtomicUsize::new(max),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            waiters: Mutex::new(Waiters::default()),
            length,
            wait,
        }
    }

    pub fn set_bounds(&self, max: usize, timeout: Duration) {
        self.max.store(max, Ordering::Relaxed);
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.lock().queue.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // A panic while holding this lock leaves the queue consistent (every operation
        // is a single push, pop or remove), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot on a backend for `client`, waiting in line if all are full.
    /// `Ok(None)`: no untried backend is available.
    pub async fn acquire(
        &self,
        upstream: &Arc<Upstream>,
        client: SocketAddr,
        tried: &[SocketAddr],
        cursor: &mut Option<usize>,
    ) -> Result<Option<Arc<Backend>>, ConnectError> {
        let (id, rx) = {
            let mut w = self.lock();
            if w.queue.is_empty()
                && let Some(i) = upstream.take_slot(client, tried, cursor)
            {
                return Ok(Some(i));
            }
            if !upstream.any_available(tried) {
                return if tried.is_empty() {
                    Err(ConnectError::NoHealthyBackend)
                } else {
                    Ok(None)
                };
            }
            if w.queue.len() >= self.max.load(Ordering::Relaxed) {
                return Err(ConnectError::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let id = w.next_id;
            w.next_id += 1;
            w.queue.push_back(Waiter {
                id,
                client,
                tried: tried.to_vec(),
                slot: tx,
            });
            self.length.set(w.queue.len() as i64);
            (id, rx)
        };
        let mut place = Place {
            queue: self,
            upstream,
            id,
            rx: Some(rx),
        };
        let started = Instant::now();
        let rx = place.rx.as_mut().ok_or(ConnectError::QueueTimeout)?;
        let limit = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        match timeout(limit, rx).await {
            Ok(Ok(i)) => {
                place.rx = None;
                self.wait.observe(started.elapsed().as_secs_f64());
                Ok(Some(i))
            }
            // The sender is dropped only with the queue itself.
            Ok(Err(_)) | Err(_) => Err(ConnectError::QueueTimeout),
        }
    }

    /// Hands free slots to waiters, oldest first, until one cannot be served.
    pub fn dispatch(&self, upstream: &Upstream) {
        let mut w = self.lock();
        while let Some(front) = w.queue.front() {
            if front.slot.is_closed() {
                w.queue.pop_front();
                continue;
            }
            let Some(i) = upstream.take_slot(front.client, &front.tried, &mut None) else {
                break;
            };
            let Some(waiter) = w.queue.pop_front() else {
                break;
            };
            if let Err(backend) = waiter.slot.send(i) {
                // It left between the check and the send: give the slot to the next.
                backend.release();
            }
        }
        self.length.set(w.queue.len() as i64);
    }
}

/// A client's place in line; leaving (by drop) removes it and passes on any slot that
/// was handed to it too late.
struct Place<'a> {
    queue: &'a Queue,
    upstream: &'a Arc<Upstream>,
    id: u64,
    rx: Option<oneshot::Receiver<Arc<Backend>>>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        {
            let mut w = self.queue.lock();
            w.queue.retain(|waiter| waiter.id != self.id);
            self.queue.length.set(w.queue.len() as i64);
        }
        if let Ok(backend) = rx.try_recv() {
            backend.release();
            self.queue.dispatch(self.upstream);
        }
    }
}
