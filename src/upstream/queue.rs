//! The wait queue of an upstream whose backends take only so many connections
//! (`max_connections_per_backend`).
//!
//! Strict FIFO: a client that finds every eligible backend full, or finds others already
//! waiting, joins the back. A freed slot is handed directly to the oldest waiter (the
//! slot is taken for it before it wakes), so no newcomer can overtake it and no herd
//! wakes. A waiter that leaves (timeout, client gone) is removed at once; a slot handed
//! to it in the meantime is passed on.
//!
//! One queue per upstream name, carried across reloads. It dispatches through the
//! upstream of the current snapshot (a `Weak` set when each snapshot is built), so a slot
//! freed by a connection from an older snapshot is handed out under the current limit
//! and backend list. One mutex per queue guards the waiters; a release takes it only
//! when someone waits (an atomic count, paired with the slot counts in SeqCst order so
//! that no wake-up is lost).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use prometheus::{Histogram, IntGauge};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

use crate::upstream::{Backend, ConnectError, Upstream};

pub struct Queue {
    /// Bounds from the latest config (a reload may change them).
    max: AtomicUsize,
    timeout_ms: AtomicU64,
    /// Waiters, plus clients between announcing themselves and taking a slot: a release
    /// that reads 0 here (after freeing its slot) cannot have missed anyone.
    waiting: AtomicUsize,
    waiters: Mutex<Waiters>,
    length: IntGauge,
    wait: Histogram,
}

#[derive(Default)]
struct Waiters {
    queue: VecDeque<Waiter>,
    next_id: u64,
    /// The upstream of the current snapshot, which dispatch picks from.
    upstream: Weak<Upstream>,
}

struct Waiter {
    id: u64,
    client: SocketAddr,
    /// Backends this client already failed to connect to.
    tried: Vec<SocketAddr>,
    /// Receives the backend whose slot was taken for this waiter, or `None` when no
    /// backend it has not tried is available any more.
    slot: oneshot::Sender<Option<Arc<Backend>>>,
}

impl Queue {
    pub fn new(max: usize, timeout: Duration, length: IntGauge, wait: Histogram) -> Queue {
        Queue {
            max: AtomicUsize::new(max),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            waiting: AtomicUsize::new(0),
            waiters: Mutex::new(Waiters::default()),
            length,
            wait,
        }
    }

    /// Makes `upstream` (of the snapshot being built) the one dispatch picks from.
    pub fn adopt(&self, upstream: &Arc<Upstream>) {
        self.lock().upstream = Arc::downgrade(upstream);
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
            // Announce before looking for room; see `waiting`.
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let leave = |result| {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                result
            };
            if w.queue.is_empty()
                && let Some(b) = upstream.take_slot(client, tried, cursor)
            {
                return leave(Ok(Some(b)));
            }
            if !upstream.any_available(tried) {
                return leave(if tried.is_empty() {
                    Err(ConnectError::NoHealthyBackend)
                } else {
                    Ok(None)
                });
            }
            if w.queue.len() >= self.max.load(Ordering::Relaxed) {
                return leave(Err(ConnectError::QueueFull));
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
            id,
            rx: Some(rx),
        };
        let started = Instant::now();
        let rx = place.rx.as_mut().ok_or(ConnectError::QueueTimeout)?;
        let limit = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        match timeout(limit, rx).await {
            Ok(Ok(slot)) => {
                place.rx = None;
                if slot.is_some() {
                    self.wait.observe(started.elapsed().as_secs_f64());
                }
                Ok(slot)
            }
            // The sender is dropped only with the queue itself.
            Ok(Err(_)) | Err(_) => Err(ConnectError::QueueTimeout),
        }
    }

    /// Hands free slots to waiters, oldest first. A waiter held back only by the
    /// backends it already tried does not block those behind it; a waiter with nothing
    /// left to try is told so at once.
    pub fn dispatch(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let Some(upstream) = self.lock().upstream.upgrade() else {
            return;
        };
        let mut w = self.lock();
        let mut i = 0;
        while i < w.queue.len() {
            let waiter = &w.queue[i];
            if waiter.slot.is_closed() {
                w.queue.remove(i);
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let fresh = waiter.tried.is_empty();
            let offer = match upstream.take_slot(waiter.client, &waiter.tried, &mut None) {
                Some(b) => Some(b),
                None if !upstream.any_available(&waiter.tried) => None,
                // Nothing has room even for a client that tried nothing: stop here.
                None if fresh => break,
                None => {
                    i += 1;
                    continue;
                }
            };
            let Some(waiter) = w.queue.remove(i) else {
                break;
            };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if let Err(Some(b)) = waiter.slot.send(offer) {
                // It left between the check and the send: the slot goes to the next.
                b.release();
            }
        }
        self.length.set(w.queue.len() as i64);
    }
}

/// A client's place in line; leaving (by drop) removes it and passes on any slot that
/// was handed to it too late.
struct Place<'a> {
    queue: &'a Queue,
    id: u64,
    rx: Option<oneshot::Receiver<Option<Arc<Backend>>>>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        {
            let mut w = self.queue.lock();
            let before = w.queue.len();
            w.queue.retain(|waiter| waiter.id != self.id);
            if w.queue.len() < before {
                self.queue.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            self.queue.length.set(w.queue.len() as i64);
        }
        if let Ok(Some(backend)) = rx.try_recv() {
            backend.release();
            self.queue.dispatch();
        }
    }
}
