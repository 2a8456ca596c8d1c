//! The wait queue of an upstream whose backends take only so many connections
//! (`max_connections_per_backend`).
//!
//! Strict FIFO: a client that finds every eligible backend full, or finds others already
//! waiting, joins the back. A freed slot is handed directly to the oldest waiter (the
//! slot is taken for it before it wakes), so no newcomer can overtake it and no herd
//! wakes. A waiter that leaves (timeout, client gone) is removed at once; a slot handed
//! to it in the meantime is passed on.
//!
//! The queue knows backends only through [`Slots`]: take a slot for a client, say whether
//! anything could take one, give one back. An upstream's `Pool` is its `Slots`; the unit
//! tests below use a counter.
//!
//! One queue per upstream name, carried across reloads. It dispatches through the slots
//! of the current snapshot (handed over by [`Queue::serve`] when a config is applied), so
//! a slot freed by a connection from an older snapshot is handed out under the current
//! limit and backend list. One mutex per queue guards the waiters; a release takes it
//! only when someone waits (an atomic count, paired with the slot counts in SeqCst order
//! so that no wake-up is lost).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{Histogram, IntGauge};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

/// Connection slots on backends, as the queue sees them.
pub trait Slots: Send + Sync + 'static {
    /// A slot taken on one backend; given back by [`Slots::give_back`] or by its owner.
    type Slot: Send + 'static;

    /// Takes a slot for `client` on an available backend with room, not one of `tried`.
    fn take(
        &self,
        client: SocketAddr,
        tried: &[SocketAddr],
        cursor: &mut Option<usize>,
    ) -> Option<Self::Slot>;

    /// Whether any backend not in `tried` could take a connection if it had room.
    fn any_available(&self, tried: &[SocketAddr]) -> bool;

    /// Frees a slot that could not be handed over (without dispatching).
    fn give_back(slot: Self::Slot);
}

/// Why the queue gave no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("no backend is available (all down, ejected or weight 0)")]
    NoHealthyBackend,
    #[error("every backend is at its connection limit and the queue is full")]
    Full,
    #[error("waited in the queue for longer than its timeout")]
    Timeout,
}

pub struct Queue<S: Slots> {
    /// Bounds from the latest config (a reload may change them).
    max: AtomicUsize,
    timeout_ms: AtomicU64,
    /// Waiters, plus clients between announcing themselves and taking a slot: a release
    /// that reads 0 here (after freeing its slot) cannot have missed anyone.
    waiting: AtomicUsize,
    waiters: Mutex<Waiters<S::Slot>>,
    /// The slots of the current snapshot, which dispatch hands out.
    current: ArcSwap<S>,
    length: IntGauge,
    wait: Histogram,
    /// When the oldest waiter joined, in ms after `origin` plus one; 0 with nobody in
    /// line. Stored under the waiters' lock whenever the front changes, so the status
    /// page reads the oldest wait without taking the lock.
    oldest: AtomicU64,
    origin: std::time::Instant,
}

struct Waiters<T> {
    queue: VecDeque<Waiter<T>>,
    next_id: u64,
}

struct Waiter<T> {
    id: u64,
    client: SocketAddr,
    /// Backends this client already failed to connect to.
    tried: Vec<SocketAddr>,
    /// Receives the slot taken for this waiter, or `None` when no backend it has not
    /// tried is available any more.
    slot: oneshot::Sender<Option<T>>,
    /// When it joined, as [`Queue::oldest`] counts.
    since: u64,
}

impl<S: Slots> Queue<S> {
    pub fn new(
        max: usize,
        timeout: Duration,
        length: IntGauge,
        wait: Histogram,
        slots: Arc<S>,
    ) -> Queue<S> {
        Queue {
            max: AtomicUsize::new(max),
            timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
            waiting: AtomicUsize::new(0),
            waiters: Mutex::new(Waiters {
                queue: VecDeque::new(),
                next_id: 0,
            }),
            current: ArcSwap::new(slots),
            length,
            wait,
            oldest: AtomicU64::new(0),
            origin: std::time::Instant::now(),
        }
    }

    /// Clients waiting now (the gauge's atomic, without the lock).
    pub fn len(&self) -> usize {
        usize::try_from(self.length.get()).unwrap_or(0)
    }

    /// How long the oldest waiter has waited; `None` with nobody in line. Lock-free.
    pub fn oldest_wait(&self) -> Option<Duration> {
        match self.oldest.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(self.now().saturating_sub(since))),
        }
    }

    /// The queue's clock: ms after `origin`, plus one so that 0 can mean "nobody".
    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// Records the front waiter's arrival; call under the lock after the line changed.
    fn front_changed(&self, w: &Waiters<S::Slot>) {
        let since = w.queue.front().map_or(0, |f| f.since);
        self.oldest.store(since, Ordering::Relaxed);
    }

    /// Makes `slots` (of the snapshot being applied) the ones dispatch hands out.
    pub fn serve(&self, slots: Arc<S>) {
        self.current.store(slots);
    }

    pub fn set_bounds(&self, max: usize, timeout: Duration) {
        self.max.store(max, Ordering::Relaxed);
        self.timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.lock().queue.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Waiters<S::Slot>> {
        // A panic while holding this lock leaves the queue consistent (every operation
        // is a single push, pop or remove), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot on a backend for `client`, waiting in line if all are full.
    /// `Ok(None)`: no untried backend is available.
    pub async fn acquire(
        &self,
        slots: &S,
        client: SocketAddr,
        tried: &[SocketAddr],
        cursor: &mut Option<usize>,
    ) -> Result<Option<S::Slot>, QueueError> {
        let (id, rx) = {
            let mut w = self.lock();
            // Announce before looking for room; see `waiting`.
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let leave = |result| {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                result
            };
            if w.queue.is_empty()
                && let Some(b) = slots.take(client, tried, cursor)
            {
                return leave(Ok(Some(b)));
            }
            if !slots.any_available(tried) {
                return leave(if tried.is_empty() {
                    Err(QueueError::NoHealthyBackend)
                } else {
                    Ok(None)
                });
            }
            if w.queue.len() >= self.max.load(Ordering::Relaxed) {
                return leave(Err(QueueError::Full));
            }
            let (tx, rx) = oneshot::channel();
            let id = w.next_id;
            w.next_id += 1;
            w.queue.push_back(Waiter {
                id,
                client,
                tried: tried.to_vec(),
                slot: tx,
                since: self.now(),
            });
            self.length.set(w.queue.len() as i64);
            if w.queue.len() == 1 {
                self.front_changed(&w);
            }
            (id, rx)
        };
        let mut place = Place {
            queue: self,
            id,
            rx: Some(rx),
        };
        let started = Instant::now();
        let rx = place.rx.as_mut().ok_or(QueueError::Timeout)?;
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
            Ok(Err(_)) | Err(_) => Err(QueueError::Timeout),
        }
    }

    /// Hands free slots to waiters, oldest first. A waiter held back only by the
    /// backends it already tried does not block those behind it; a waiter with nothing
    /// left to try is told so at once.
    pub fn dispatch(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        let slots = self.current.load();
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
            let offer = match slots.take(waiter.client, &waiter.tried, &mut None) {
                Some(b) => Some(b),
                None if !slots.any_available(&waiter.tried) => None,
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
                S::give_back(b);
            }
        }
        self.length.set(w.queue.len() as i64);
        self.front_changed(&w);
    }
}

/// A client's place in line; leaving (by drop) removes it and passes on any slot that
/// was handed to it too late.
struct Place<'a, S: Slots> {
    queue: &'a Queue<S>,
    id: u64,
    rx: Option<oneshot::Receiver<Option<S::Slot>>>,
}

impl<S: Slots> Drop for Place<'_, S> {
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
            self.queue.front_changed(&w);
        }
        if let Ok(Some(slot)) = rx.try_recv() {
            S::give_back(slot);
            self.queue.dispatch();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Slots on one backend with room for `free` more connections.
    struct Counter {
        free: AtomicUsize,
        available: AtomicBool,
    }

    /// A slot on [`Counter`]; returns its room when given back.
    struct Taken(Arc<Counter>);

    /// The counter a test reads; `Slots` is implemented on a shared handle to it.
    struct Shared(Arc<Counter>);

    impl Slots for Shared {
        type Slot = Taken;

        fn take(
            &self,
            _: SocketAddr,
            tried: &[SocketAddr],
            _: &mut Option<usize>,
        ) -> Option<Taken> {
            if !tried.is_empty() || !self.0.available.load(Ordering::SeqCst) {
                return None;
            }
            self.0
                .free
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .ok()
                .map(|_| Taken(Arc::clone(&self.0)))
        }

        fn any_available(&self, tried: &[SocketAddr]) -> bool {
            tried.is_empty() && self.0.available.load(Ordering::SeqCst)
        }

        fn give_back(slot: Taken) {
            slot.0.free.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn queue(free: usize, max: usize, wait: Duration) -> (Arc<Queue<Shared>>, Arc<Counter>) {
        let counter = Arc::new(Counter {
            free: AtomicUsize::new(free),
            available: AtomicBool::new(true),
        });
        let m = crate::metrics::Metrics::new().unwrap().upstream("t");
        let q = Queue::new(
            max,
            wait,
            m.queue_length,
            m.queue_wait,
            Arc::new(Shared(Arc::clone(&counter))),
        );
        (Arc::new(q), counter)
    }

    fn client(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    /// Frees one slot and hands it on, as a connection's lease does when it ends.
    fn release(q: &Queue<Shared>, slot: Taken) {
        Shared::give_back(slot);
        q.dispatch();
    }

    async fn acquire(q: &Queue<Shared>, n: u16) -> Result<Option<Taken>, QueueError> {
        let slots = q.current.load_full();
        q.acquire(&slots, client(n), &[], &mut None).await
    }

    /// Waits until `n` clients are in line.
    async fn in_line(q: &Queue<Shared>, n: usize) {
        while q.lock().queue.len() != n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn freed_slots_go_to_waiters_in_arrival_order() {
        let (q, counter) = queue(1, 10, Duration::from_secs(60));
        let first = acquire(&q, 1).await.unwrap().expect("room");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for n in 2..=4 {
            let (waiter, tx) = (Arc::clone(&q), tx.clone());
            tokio::spawn(async move {
                let slot = acquire(&waiter, n).await.unwrap().expect("a slot");
                tx.send((n, slot)).unwrap();
            });
            in_line(&q, usize::from(n) - 1).await;
        }
        // A newcomer finds others waiting and queues behind them, even with room free.
        release(&q, first);
        let (n, slot) = rx.recv().await.unwrap();
        assert_eq!(n, 2);
        release(&q, slot);
        assert_eq!(rx.recv().await.unwrap().0, 3);
        assert_eq!(counter.free.load(Ordering::SeqCst), 0);
        assert_eq!(q.length.get(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_waiter_times_out() {
        let (q, _) = queue(0, 1, Duration::from_millis(50));
        let waiting = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { acquire(&q, 1).await.err() })
        };
        assert_eq!(q.oldest_wait(), None, "nobody waits yet");
        in_line(&q, 1).await;
        assert!(q.oldest_wait().is_some(), "the waiter's wait is seen");
        assert_eq!(q.len(), 1);
        assert_eq!(acquire(&q, 2).await.err(), Some(QueueError::Full));
        assert_eq!(waiting.await.unwrap(), Some(QueueError::Timeout));
        assert!(q.is_empty(), "a waiter that timed out leaves the line");
        assert_eq!(q.oldest_wait(), None, "and its wait with it");
        assert_eq!(q.len(), 0);
        assert_eq!(q.waiting.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_slot_handed_to_a_waiter_that_left_goes_to_the_next() {
        let (q, counter) = queue(1, 10, Duration::from_secs(60));
        let first = acquire(&q, 1).await.unwrap().unwrap();
        let leaving = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { acquire(&q, 2).await })
        };
        in_line(&q, 1).await;
        let staying = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { acquire(&q, 3).await })
        };
        in_line(&q, 2).await;
        leaving.abort();
        let _ = leaving.await;
        release(&q, first);
        assert!(staying.await.unwrap().unwrap().is_some());
        assert_eq!(
            counter.free.load(Ordering::SeqCst),
            0,
            "no slot lost or doubled"
        );
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn nothing_available_is_an_error_at_once_and_wakes_waiters() {
        let (q, counter) = queue(0, 10, Duration::from_secs(60));
        let waiting = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { acquire(&q, 1).await })
        };
        in_line(&q, 1).await;
        counter.available.store(false, Ordering::SeqCst);
        q.dispatch();
        assert!(
            waiting.await.unwrap().unwrap().is_none(),
            "told there is nothing left to try"
        );
        assert_eq!(
            acquire(&q, 2).await.err(),
            Some(QueueError::NoHealthyBackend)
        );
    }
}
